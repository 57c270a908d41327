"""Recipes: how a step is computed. The targets of conf/recipe/*.yaml."""

from vitlab.recipes.base import Recipe
from vitlab.recipes.supervised import Supervised

__all__ = ["Recipe", "Supervised"]
