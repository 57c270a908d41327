"""vitlab-train: compose a run from conf/train.yaml and train it.

    vitlab-train                                      # default experiment (digits)
    vitlab-train experiment=vit_cifar10 data.root=../shared/data/cifar10-subset
    python -m vitlab.cli.train trainer=ddp trainer.devices=2
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from vitlab.cli.common import config_dir, fail, validate_command_line

log = logging.getLogger("vitlab")


def train(cfg: DictConfig) -> dict:
    """Build and run one training job; return its final metrics (also in metrics.json)."""
    from vitlab.data import CorruptDataError, DataConfigError, DatasetNotFoundError
    from vitlab.lit.build import build_run
    from vitlab.lit.callbacks import atomic_write_text

    # The run directory Hydra made is the one every process writes to (DDP children get the parent's).
    if HydraConfig.initialized():
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    out = Path(cfg.paths.output_dir)
    try:
        run = build_run(cfg)
    except (DatasetNotFoundError, FileNotFoundError, DataConfigError) as e:
        fail(str(e))
    except (ValueError, InstantiationException) as e:    # a value a builder refused (it names the key and the fix)
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        fail(f"{cause} (while building the run)")
    trainer = run.trainer
    if trainer.is_global_zero:
        log.info("%s", run.derived.describe())
        log.info("run directory: %s", out)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except CorruptDataError as e:                   # too much unreadable data: the message names the files' fix
        fail(f"{e} The last checkpoint is in {out / 'checkpoints'}; resume with ckpt_path=... once fixed.")
    if cfg.run_test and run.source.has_split("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(run.module, datamodule=run.datamodule, ckpt_path=best or None, weights_only=False)
    elif cfg.run_test and trainer.is_global_zero:
        log.info("no test stage: %s has no test split (splits: %s)", run.source.name, ", ".join(run.source.splits))
    metrics = {}
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
    if trainer.is_global_zero:
        shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
        print("[vitlab] final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    best = sorted(k for k in metrics if k.startswith("val/best_"))          # the monitored metric's best value
    return metrics[best[0]] if best else metrics.get("val/top1", 0.0)       # the value sweepers optimise


def main() -> None:
    validate_command_line("train", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
