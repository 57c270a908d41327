"""Reusable checks of the declared contracts (vitlab/backbones/base.py, vitlab/tasks/base.py): a new backbone or task
calls these from its own test file (CONTRIBUTING.md), so what the rest of vitlab reads of it is checked once, the
same way for every implementation."""

from __future__ import annotations

from typing import Any

import torch

from vitlab.backbones.base import KIND_TEXT, Backbone
from vitlab.tasks.base import Task


def check_backbone(backbone: Backbone, images: torch.Tensor | None = None) -> dict:
    """The declared members are there and agree with what ``forward`` returns; returns the features."""
    assert isinstance(backbone, Backbone), f"{type(backbone).__name__} does not subclass vitlab.backbones.base.Backbone"
    b = backbone
    assert b.kind in KIND_TEXT, b.kind
    for name in ("embed_dim", "patch_size", "in_chans"):
        assert isinstance(getattr(b, name), int) and getattr(b, name) > 0, name
    assert len(b.img_size) == 2 and len(b.grid) == 2, (b.img_size, b.grid)
    assert isinstance(b.num_prefix_tokens, int) and b.num_prefix_tokens >= 0
    assert b.mask_mode in (None, "drop", "replace")
    assert isinstance(b.num_layers, int) and b.num_layers >= 0
    # layer-wise lr decay: every parameter has a layer in 0 .. num_layers + 1, and each block is one
    names = [n for n, _ in b.named_parameters()]
    ids = {n: b.layer_id(n) for n in names}
    assert all(0 <= i <= b.num_layers + 1 for i in ids.values()), ids
    if b.num_layers:
        assert set(range(1, b.num_layers + 1)) <= set(ids.values()), "a block has no parameter with its layer id"
    # FSDP units are the backbone's own submodules; no-weight-decay names are its parameters
    own = {id(m) for m in b.modules()}
    assert all(id(u) in own for u in b.fsdp_units())
    assert set(b.no_weight_decay()) <= set(names), set(b.no_weight_decay()) - set(names)
    if images is None:
        return {}
    b.eval()
    with torch.no_grad():
        if b.kind == "denoiser":
            B = images.shape[0]
            out = b(images, torch.full((B,), 10.0), None)
            assert out.shape[0] == B and out.shape[-2:] == images.shape[-2:]
            return {"prediction": out}
        f = b(images)
    B = images.shape[0]
    assert isinstance(f, dict)
    assert f["pooled"].shape == (B, b.embed_dim)
    if "patch_2d" in f:
        assert f["patch_2d"].shape[:2] == (B, b.embed_dim)
        if tuple(images.shape[-2:]) == tuple(b.img_size):
            assert tuple(f["patch_2d"].shape[-2:]) == tuple(b.grid)
    if b.has_class_token:
        assert f["cls"].shape == (B, b.embed_dim)
    if b.has_dist_token:
        assert f["dist"].shape == (B, b.embed_dim)
    if b.num_registers:
        assert f["registers"].shape == (B, b.num_registers, b.embed_dim)
    if b.pyramid_channels is not None:
        assert [int(m.shape[1]) for m in f["pyramid"]] == list(b.pyramid_channels)
        assert len(b.pyramid_strides) == len(b.pyramid_channels)
    return f


def check_task(task: Task, backbone: Any, batch: dict) -> dict:
    """A task's declared attributes, a training step (a finite loss with a gradient), an evaluation step that its
    metrics accept, and the epoch's metric values; returns those values."""
    cls = type(task)
    assert isinstance(task, Task), f"{cls.__name__} does not subclass vitlab.tasks.base.Task"
    for name in ("kind", "data_kind", "data_hint", "backbone_hint"):
        assert getattr(cls, name) not in ("?", ""), name
    assert task.monitor.startswith("val/") and task.monitor_mode in ("max", "min")
    assert isinstance(cls.lr_base_batch, int) and cls.lr_base_batch > 0
    task.train()
    out = task.training_step(backbone, batch)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    task.eval()
    metrics = task.metrics()
    task.on_evaluation_start()
    with torch.no_grad():
        ev = task.evaluation_step(backbone, batch)
    assert all(torch.is_tensor(v) and v.ndim == 0 for k, v in ev.items() if k not in ("preds", "target"))
    values: dict = {}
    if "preds" in ev:
        metrics.update(ev["preds"], ev["target"])
        values = task.compute_metrics(metrics)
        assert task.monitor.removeprefix("val/") in values or task.monitor == "val/loss", (task.monitor, values)
    return values
