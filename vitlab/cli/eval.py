"""vitlab-eval: rebuild a model from its checkpoint alone and evaluate it.

    vitlab-eval ckpt=outputs/.../checkpoints/best.ckpt split=test
    vitlab-eval ckpt=PATH data=cifar10 data.root=DIR split=test metrics_file=OUT.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from vitlab.cli.common import config_dir, fail, validate_command_line

log = logging.getLogger("vitlab")


def evaluate(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl

    from vitlab.data import DatasetNotFoundError
    from vitlab.layers.attention import set_backend as set_attention_backend
    from vitlab.lit.build import build_datamodule, build_source, load_checkpoint, resolve_precision
    from vitlab.lit.callbacks import atomic_write_text

    set_attention_backend(cfg.attention_backend)
    if not Path(cfg.ckpt).is_file():
        fail(f"checkpoint not found: {cfg.ckpt}. Give ckpt=PATH to a vitlab .ckpt file "
             "(a run writes checkpoints/last.ckpt and checkpoints/best.ckpt).")
    module = load_checkpoint(cfg.ckpt)
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
        if not source.has_split(cfg.split):
            raise DatasetNotFoundError(source.missing_split_message(cfg.split))
    except (DatasetNotFoundError, FileNotFoundError) as e:
        fail(str(e))
    if source.num_classes != module.data_info.get("num_classes"):
        fail(f"the checkpoint predicts {module.data_info.get('num_classes')} classes but {source.name} has "
             f"{source.num_classes}; evaluate on the dataset it was trained for")
    dm = build_datamodule(run_cfg, source)
    dm.eval_split = module.eval_split = cfg.split
    t = cfg.trainer
    trainer = pl.Trainer(accelerator=t.accelerator, devices=1, precision=resolve_precision(t.precision, t.accelerator),
                         logger=False, enable_checkpointing=False, enable_progress_bar=t.enable_progress_bar,
                         limit_test_batches=t.limit_test_batches)
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    metrics = {k: float(v) for k, v in results.items()}
    print(f"\n{'metric':<16}{'value':>10}\n" + "-" * 26)
    for k, v in sorted(metrics.items()):
        print(f"{k:<16}{v:>10.4f}")
    metrics_file = Path(cfg.metrics_file) if cfg.metrics_file \
        else Path(cfg.ckpt).parent.parent / f"eval_{cfg.split}.json"
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
