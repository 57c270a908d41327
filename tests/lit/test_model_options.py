"""The run-time knobs wired in lit/build.py: model.activation_checkpointing, model.compile, loss_check_interval,
and the FSDP strategy config (conf/trainer/fsdp.yaml)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF
from vitlab.lit.build import apply_model_options, build_module, build_recipe, build_source, data_info, derive


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2",
                                           *overrides])


def _recipe(cfg):
    source = build_source(cfg)
    return build_recipe(cfg, data_info(cfg, source)), source


def test_defaults_change_nothing():
    cfg = compose_train()
    recipe, _ = _recipe(cfg)
    assert apply_model_options(recipe, cfg.model) == []
    assert recipe.backbone.grad_checkpointing is False
    assert getattr(recipe.backbone, "_compiled_call_impl", None) is None


def test_activation_checkpointing_is_switched_on_in_the_backbone():
    cfg = compose_train("model.activation_checkpointing=true")
    recipe, _ = _recipe(cfg)
    done = apply_model_options(recipe, cfg.model)
    assert recipe.backbone.grad_checkpointing is True
    assert done == ["activation checkpointing in each of 2 blocks"]


def test_activation_checkpointing_needs_a_backbone_that_supports_it():
    cfg = compose_train("model.activation_checkpointing=true")
    recipe, _ = _recipe(cfg)
    from vitlab.backbones.base import Backbone

    class Plain(Backbone):                                   # the contract's default: no activation checkpointing
        pass

    recipe.backbone = Plain()
    with pytest.raises(ValueError, match="Plain does not support activation checkpointing.*=false"):
        apply_model_options(recipe, cfg.model)


def test_compile_is_in_place_and_keeps_parameter_names():
    """nn.Module.compile: the same module object, the same state_dict keys (checkpoints stay loadable by the eager
    model); compilation itself happens lazily at the first call (tests/e2e/test_compile.py runs it)."""
    cfg = compose_train("model.compile=true", "model.compile_mode=reduce-overhead")
    recipe, _ = _recipe(cfg)
    keys = list(recipe.state_dict())
    backbone = recipe.backbone
    done = apply_model_options(recipe, cfg.model)
    assert recipe.backbone is backbone and list(recipe.state_dict()) == keys
    assert backbone._compiled_call_impl is not None
    assert done == ["torch.compile(backbone, mode=reduce-overhead)"]


@pytest.mark.parametrize("value, expected", [("null", None), ("1", 1), ("25", 25)])
def test_loss_check_interval_reaches_the_module(value, expected):
    cfg = compose_train(f"loss_check_interval={value}")
    recipe, source = _recipe(cfg)
    module = build_module(cfg, recipe, derive(cfg, recipe), data_info(cfg, source))
    assert module.guard.check_interval == expected


def test_fused_adamw_option_reaches_the_optimizer():
    cfg = compose_train("optim.fused=true")
    recipe, _ = _recipe(cfg)
    opt = instantiate(cfg.optim, _convert_="all")(recipe)
    assert opt.defaults["fused"] is True


# ------------------------------------------------------------------- FSDP ---

def test_fsdp_config_builds_the_strategy_that_shards_the_declared_units():
    from vitlab.layers import Block
    from vitlab.lit.strategies import FSDP

    cfg = compose_train("trainer=fsdp", "trainer.strategy.reshard_after_forward=false",
                        "trainer.strategy.param_dtype=bfloat16", "trainer.strategy.reduce_dtype=float32")
    strategy = instantiate(cfg.trainer.strategy, _convert_="all")
    assert isinstance(strategy, FSDP)
    assert strategy.wrap_classes is None                   # the backbone's fsdp_units() decide
    recipe, _ = _recipe(compose_train("recipe=mae", "recipe.decoder_depth=2", "recipe.decoder_embed_dim=32",
                                      "recipe.decoder_num_heads=2"))
    units = recipe.fsdp_units()
    assert units[:len(recipe.backbone.blocks)] == list(recipe.backbone.blocks)      # the encoder's blocks ...
    assert units[len(recipe.backbone.blocks):] == list(recipe.decoder.blocks)      # ... and MAE's decoder's
    assert all(isinstance(u, Block) for u in units)
    dino, _ = _recipe(compose_train("recipe=dino", "recipe.out_dim=16", "recipe.hidden_dim=16",
                                    "recipe.bottleneck_dim=8", "recipe.num_local_crops=0"))
    assert dino.fsdp_units() == list(dino.backbone.blocks) + list(dino.teacher_backbone.blocks)   # the teacher's too
    named = instantiate(cfg.trainer.strategy, wrap=["vitlab.layers.Block"], _convert_="all")
    assert named.wrap_classes == (Block,)
    assert strategy.reshard_after_forward is False
    assert (strategy.param_dtype, strategy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert OmegaConf.select(cfg, "trainer.strategy.save_distributed_checkpoint") is False


@pytest.mark.parametrize("wrap, needle", [("vitlab.backbones.vit.Nope", "cannot import"),
                                          ("torch.float32", "not an nn.Module class"), ("nodots", "cannot import"),
                                          ("vitlab.backbones.vit.parse_variant", "not an nn.Module class")])
def test_fsdp_wrong_wrap_class_is_named(wrap, needle):
    from vitlab.lit.strategies import fsdp

    with pytest.raises(ValueError, match=needle):
        fsdp(wrap=[wrap])


def test_fsdp_wrong_dtype_is_named():
    from vitlab.lit.strategies import fsdp

    with pytest.raises(ValueError, match="bfloat16"):
        fsdp(param_dtype="bf16")


def test_the_configured_attention_backend_is_set_and_named_in_the_log(tmp_path, caplog):
    import importlib
    import logging

    from vitlab.lit.build import build_run

    attn = importlib.import_module("vitlab.layers.attention")
    prev = (attn._backend, attn._source)
    try:
        cfg = compose_train("attention_backend=sdpa_math", f"paths.output_dir={tmp_path}", "logger=[]")
        run = build_run(cfg)
        assert attn.get_backend() == "sdpa_math"
        with caplog.at_level(logging.INFO, logger=attn.__name__):
            attn._logged.clear()
            run.module.recipe(torch.zeros(2, 1, 64, 64))
        assert "attention backend: sdpa_math -> kernel math (attention_backend=sdpa_math)" in caplog.text
    finally:
        attn._backend, attn._source = prev
