"""Recipes: how a step is computed. The targets of conf/recipe/*.yaml."""

from vitlab.recipes.base import Recipe
from vitlab.recipes.dino import DINO, DINOHead, DINOLoss
from vitlab.recipes.distill import Distill, hard_distillation_loss, load_timm_teacher, soft_distillation_loss
from vitlab.recipes.ema import ModelEma
from vitlab.recipes.mae import MAE
from vitlab.recipes.simmim import SimMIM
from vitlab.recipes.supervised import Supervised

__all__ = ["ModelEma", "Distill", "hard_distillation_loss", "load_timm_teacher", "soft_distillation_loss",
           "DINO", "DINOHead", "DINOLoss", "MAE", "Recipe", "SimMIM", "Supervised"]
