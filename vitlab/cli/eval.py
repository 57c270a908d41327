"""vitlab-eval: rebuild a model from its checkpoint alone and evaluate it.

Three protocols (``protocol=``):

- ``classifier`` (default): the model's own head on the split, through Lightning's ``trainer.test``;
- ``knn``: DINO's weighted kNN on the frozen features (train split as the reference set);
- ``linear``: a linear probe on the frozen features (lr chosen on held-out train features).

    vitlab-eval ckpt=outputs/.../checkpoints/best.ckpt                       # split=auto: test, else val
    vitlab-eval ckpt=PATH data=cifar10 data.root=DIR split=test metrics_file=OUT.json
    vitlab-eval ckpt=PATH protocol=knn knn.k=20 feature=cls
    vitlab-eval ckpt=PATH protocol=linear data=cifar10 data.root=DIR max_train_samples=10000
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vitlab.cli.common import config_dir, fail, validate_command_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger("vitlab")

PROTOCOLS = ("classifier", "knn", "linear")
FEATURES = ("pooled", "cls", "avg")
SPLITS = ("auto", "train", "val", "test")


def check_choices(cfg: DictConfig) -> None:
    """Stop with exit code 2 on a protocol, feature or split that is not one of the choices."""
    for key, value, choices in (("protocol", cfg.protocol, PROTOCOLS), ("feature", cfg.feature, FEATURES),
                                ("split", cfg.split, SPLITS)):
        if value not in choices:
            fail(f"unknown {key}={value!r}; choose one of: {', '.join(choices)} (e.g. {key}={choices[0]})")


def resolve_split(source: Any, split: str) -> str:
    """``auto`` -> ``test`` when the data has a test split, else ``val`` (logged); other names pass through."""
    if split != "auto":
        return split
    chosen = "test" if source.has_split("test") else "val"
    log.info("split=auto: evaluating on the %s split (%s)", chosen,
             f"{source.name} has a test split" if chosen == "test" else
             f"{source.name} has no test split; give split=test|val|train to choose")
    return chosen


def eval_device(accelerator: str) -> torch.device:
    """The one device the frozen-feature protocols run on, from ``trainer.accelerator``."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        fail(f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer.accelerator=cpu")
    return torch.device("cpu")


def _classifier(cfg: DictConfig, module: Any, dm: Any, split: str) -> dict[str, float]:
    import pytorch_lightning as pl

    from vitlab.lit.build import resolve_precision

    dm.eval_split = module.eval_split = split
    t = cfg.trainer
    trainer = pl.Trainer(accelerator=t.accelerator, devices=1, precision=resolve_precision(t.precision, t.accelerator),
                         logger=False, enable_checkpointing=False, enable_progress_bar=t.enable_progress_bar,
                         limit_test_batches=t.limit_test_batches)
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


def _frozen_features(cfg: DictConfig, module: Any, dm: Any, num_classes: int, split: str) -> dict[str, Any]:
    """The kNN or linear-probe protocol on the features of ``module``'s evaluation recipe."""
    from vitlab.lit.build import resolve_precision
    from vitlab.lit.probes import autocast_dtype, eval_recipe
    from vitlab.metrics import extract_features, knn_accuracy, linear_probe

    t = cfg.trainer
    device = eval_device(t.accelerator)
    amp = autocast_dtype(resolve_precision(t.precision, t.accelerator), device) if device.type == "cuda" else None
    recipe = eval_recipe(module).to(device).eval()
    log.info("%s protocol on the %r features, %s%s", cfg.protocol, cfg.feature, device,
             f" (autocast {amp})" if amp else "")

    def fn(images):
        return recipe.features(images, cfg.feature)

    max_train = cfg.max_train_samples
    train_f, train_y = extract_features(fn, dm.eval_loader("train", max_samples=max_train), device,
                                        max_samples=max_train, autocast_dtype=amp, desc="train features")
    eval_f, eval_y = extract_features(fn, dm.eval_loader(split), device, autocast_dtype=amp,
                                      desc=f"{split} features")
    if split == "train":
        log.warning("split=train: the evaluated images are also the reference/training set, so this measures "
                    "fit, not generalisation (kNN finds each image itself)")
    out: dict[str, Any] = {"protocol": cfg.protocol, "split": split, "feature": cfg.feature,
                           "num_train": len(train_f), "num_eval": len(eval_f)}
    if cfg.protocol == "knn":
        k, temperature = int(cfg.knn.k), float(cfg.knn.temperature)
        res = knn_accuracy(train_f.to(device), train_y.to(device), eval_f.to(device), eval_y.to(device),
                           num_classes, k=k, temperature=temperature)
        out.update({f"knn/{m.removeprefix('knn_')}": v for m, v in res.items()})
        out.update({"knn/k": min(k, len(train_f)), "knn/temperature": temperature})
    else:
        lc = cfg.linear
        res = linear_probe(train_f, train_y, eval_f, eval_y, num_classes, epochs=int(lc.epochs),
                           batch_size=int(lc.batch_size), lrs=list(lc.lrs), weight_decay=float(lc.weight_decay),
                           holdout_fraction=float(lc.holdout_fraction), seed=int(lc.seed), device=device)
        # nan (no holdout, a single lr) is not valid JSON: null
        out.update({f"linear/{m.removeprefix('linear_')}": None if math.isnan(v) else v
                    for m, v in res.items()})
        out["linear/epochs"] = int(lc.epochs)
    return out


def _print_table(metrics: dict[str, Any]) -> None:
    print(f"\n{'metric':<22}{'value':>12}\n" + "-" * 34)
    for k, v in sorted(metrics.items()):
        text = f"{v:>12.4f}" if isinstance(v, float) else f"{v!s:>12}"
        print(f"{k:<22}{text}")


def evaluate(cfg: DictConfig) -> dict:
    from vitlab.backbones.base import KIND_TEXT
    from vitlab.checkpoints import NotACheckpointError
    from vitlab.data import DatasetNotFoundError
    from vitlab.layers.attention import set_backend as set_attention_backend
    from vitlab.lit.build import build_datamodule, build_source, load_checkpoint
    from vitlab.io import atomic_write_text

    check_choices(cfg)
    set_attention_backend(cfg.attention_backend)
    if not Path(cfg.ckpt).is_file():
        fail(f"checkpoint not found: {cfg.ckpt}. Give ckpt=PATH to a vitlab .ckpt file "
             "(a run writes checkpoints/last.ckpt and checkpoints/best.ckpt).")
    try:
        module = load_checkpoint(cfg.ckpt)
    except NotACheckpointError as e:
        fail(str(e))
    backbone = module.recipe.backbone
    if cfg.protocol != "classifier" and backbone.kind != "encoder":
        fail(f"protocol={cfg.protocol} reads an image encoder's features; {cfg.ckpt} holds {KIND_TEXT[backbone.kind]}"
             f" ({type(backbone).__name__}): use protocol=classifier (its own task's metrics)"
             + (" or vitlab-sample" if module.recipe.task.draws_samples else ""))
    run_cfg = OmegaConf.create(module.config)
    if cfg.get("data") is not None:
        data = OmegaConf.merge(cfg.data, {"img_size": run_cfg.data.img_size})
        if cfg.data.img_size != run_cfg.data.img_size:
            log.warning("data.img_size set to the model's %s", run_cfg.data.img_size)
    else:
        data = run_cfg.data
    if cfg.batch_size:
        data.eval_batch_size = cfg.batch_size
    run_cfg = OmegaConf.merge(run_cfg, {"data": None})
    run_cfg.data = data
    try:
        source = build_source(run_cfg)
        split = resolve_split(source, cfg.split)
        if not source.has_split(split):
            raise DatasetNotFoundError(source.missing_split_message(split))
        if cfg.protocol != "classifier" and not source.has_split("train"):
            raise DatasetNotFoundError(source.missing_split_message("train") +
                                       f" (protocol={cfg.protocol} needs the train split as its reference set)")
    except (DatasetNotFoundError, FileNotFoundError) as e:
        fail(str(e))
    if cfg.protocol != "classifier" and source.label_kind != "class":
        fail(f"protocol={cfg.protocol} scores frozen features against one class label per image; {source.name} is "
             f"{source.task} data: use protocol=classifier (the model's own {source.task} head and metrics)")
    if cfg.protocol == "classifier":
        # the model's own head predicts the classes it was trained on; knn / linear work on any labelled data
        if source.num_classes != module.data_info.get("num_classes"):
            fail(f"the checkpoint predicts {module.data_info.get('num_classes')} classes but {source.name} has "
                 f"{source.num_classes}; evaluate on the dataset it was trained for, or use protocol=knn|linear "
                 "to evaluate the frozen features on this one")
    elif source.in_chans != module.data_info.get("in_chans", source.in_chans):
        fail(f"the model reads {module.data_info.get('in_chans')}-channel images but {source.name} has "
             f"{source.in_chans}; evaluate it on data with the channels it was trained on")
    dm = build_datamodule(run_cfg, source)
    if cfg.protocol == "classifier":
        metrics: dict[str, Any] = _classifier(cfg, module, dm, split)
        default_name = f"eval_{split}.json"
    else:
        metrics = _frozen_features(cfg, module, dm, source.num_classes, split)
        default_name = f"eval_{cfg.protocol}_{split}.json"
    _print_table(metrics)
    metrics_file = Path(cfg.metrics_file) if cfg.metrics_file else Path(cfg.ckpt).parent.parent / default_name
    atomic_write_text(metrics_file, json.dumps(metrics, indent=2, sort_keys=True))
    print(f"[vitlab] metrics written to {metrics_file}")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    validate_command_line("eval", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
