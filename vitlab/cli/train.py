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
from vitlab.cli.launch import (external_ranks, is_spawned_child, job, release_children, run_ranks, run_spawned_child,
                               shared_config)

log = logging.getLogger("vitlab")


def train(cfg: DictConfig) -> dict:
    """Build and run one training job; return its final metrics (also in metrics.json)."""
    from vitlab.data import CorruptDataError, DataConfigError, DatasetNotFoundError
    from vitlab.lit.build import build_run
    from vitlab.io import atomic_write_text
    from vitlab.lit.environment import EnvironmentRecord

    # The run directory Hydra made is the one every process writes to (the other ranks get rank 0's config).
    if HydraConfig.initialized():
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    cfg = shared_config(cfg)            # torchrun / srun / submitit tasks: every rank trains rank 0's config
    out = Path(cfg.paths.output_dir)
    # -- fault tolerance (vitlab/lit/fault/): the run directory takes a write, a killed save's temporary files go,
    # and the checkpoint to start from is decided (ckpt_path=auto; a preempted run resumes by itself)
    from vitlab.lit import fault

    try:
        cfg.ckpt_path = fault.prepare_run_dir(cfg, out)
    except fault.RunDirError as e:
        fail(str(e))
    try:
        run = build_run(cfg)
    except (DatasetNotFoundError, FileNotFoundError, DataConfigError) as e:
        fail(str(e))
    except (ValueError, InstantiationException) as e:    # a value a builder refused (it names the key and the fix)
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        fail(f"{cause} (while building the run)")
    try:
        fault.check_free_space(cfg, out, run.module)     # room for the checkpoints, before any training
    except (fault.RunDirError, ValueError) as e:
        fail(str(e))
    trainer = run.trainer
    trainer.callbacks.append(EnvironmentRecord(str(out)))      # environment.json: versions, commit, hardware, ranks
    if trainer.is_global_zero:
        log.info("%s", run.derived.describe())
        log.info("run directory: %s", out)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    # the DDP processes Lightning starts train this config.yaml; after the job they are gone, and so is their group
    with job(trainer, out / "config.yaml"):
        try:
            trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
        except CorruptDataError as e:               # too much unreadable data: the message names the files' fix
            fail(f"{e} The last checkpoint is in {out / 'checkpoints'}; resume with ckpt_path=... once fixed.")
        except fault.Preempted as e:                # the checkpoint is written: requeue, exit 75 (EXIT_PREEMPTED)
            release_children(trainer)               # they exit 75 too: Lightning's watcher must not kill this one
            fault.exit_preempted(e)
        except (OSError, RuntimeError) as e:        # a full disk: say so, and which checkpoint is intact
            message = fault.disk_full_message(e, out)
            if message is None:
                raise
            fail(message)
        if cfg.run_test and run.source.has_split("test"):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(run.module, datamodule=run.datamodule, ckpt_path=best or None, weights_only=False)
        elif cfg.run_test and trainer.is_global_zero:
            log.info("no test stage: %s has no test split (splits: %s)", run.source.name,
                     ", ".join(run.source.splits))
    metrics = {}
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
    if trainer.is_global_zero:
        shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
        print("[vitlab] final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    return sweep_objective(train(cfg))


def sweep_objective(metrics: dict) -> float:
    """The value a sweeper optimises: the monitored metric's best value (``val/best_<metric>``, written by
    RunArtifacts for the recipe's monitor), else the kNN monitor's or the classifier's last value. NaN when the run
    logged none of them (e.g. a pretraining recipe without the kNN monitor): the Optuna sweeper then records a failed
    trial, rather than a 0.0 that a minimising study would take for the best."""
    best = [k for k in metrics if k.startswith("val/best_")]
    if len(best) == 1:
        return float(metrics[best[0]])
    if best:        # several monitors (should not happen): the one that is not an auxiliary probe
        main = [k for k in best if "knn" not in k] or best
        return float(metrics[sorted(main)[0]])
    for key in ("val/knn_top1", "val/top1"):
        if key in metrics:
            return float(metrics[key])
    log.warning("no metric to optimise in metrics.json (no val/best_*, val/knn_top1 or val/top1): returning NaN")
    return float("nan")


def main() -> None:
    if is_spawned_child():              # a DDP process Lightning started: rank 0's config.yaml, no Hydra
        run_spawned_child(train)
        return
    validate_command_line("train", sys.argv[1:])    # on every rank of a torchrun / srun launch: all fail at once
    ranks = external_ranks()
    if ranks is None:
        _hydra_main()
    else:                               # rank 0 runs Hydra, the others train each job's config it sends
        run_ranks(ranks, _hydra_main, train)


if __name__ == "__main__":
    main()
