"""vitlab-shards: write any vitlab data source as WebDataset shards (see vitlab/data/shards.py).

    vitlab-shards data=cifar10 data.root=DIR output_dir=OUT shard_size=10000
    vitlab-shards data=imagefolder data.root=/data/imagenet output_dir=OUT splits=[train,val]
    python scripts/make_shards.py data=digits output_dir=OUT overwrite=true
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from vitlab.cli.common import config_dir, fail, validate_command_line

log = logging.getLogger("vitlab")


def make_shards(cfg: DictConfig) -> dict:
    """Build ``cfg.data.source``, check it, and write its splits to ``cfg.output_dir``; return the info dict."""
    from vitlab.data.shards import write_shards

    try:
        source = hydra.utils.instantiate(cfg.data.source, _convert_="all")
        source.check()
        info = write_shards(source, cfg.output_dir, splits=list(cfg.splits), max_count=int(cfg.shard_size),
                            max_size=float(cfg.shard_max_bytes), verify=bool(cfg.verify),
                            overwrite=bool(cfg.overwrite), progress=bool(cfg.progress))
    # DatasetNotFoundError (a FileNotFoundError), shards already there (names overwrite=true), too many
    # unreadable images or bad options (ValueError): each message names the problem and the fix
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        fail(str(e))
    total = sum(s["num_samples"] for s in info["splits"].values())
    print(f"[vitlab] wrote {total} images of {source.name} ({', '.join(info['splits'])}) to {cfg.output_dir}",
          flush=True)
    return info


def _check_output_dir(argv: list[str]) -> None:
    """``output_dir`` is mandatory; say so plainly (Hydra would fail resolving its run dir from it)."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/"))]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="shards", overrides=overrides)
    if OmegaConf.is_missing(cfg, "output_dir") or not str(cfg.output_dir).strip():
        fail("no output folder given: add output_dir=DIR (the folder that will hold the .tar shards, "
             "classes.json and info.json)")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="shards")
def _hydra_main(cfg: DictConfig) -> None:
    make_shards(cfg)


def main() -> None:
    argv = sys.argv[1:]
    validate_command_line("shards", argv)
    if not any(a.startswith("-") for a in argv):          # --help, --cfg, -m ...: left to Hydra
        _check_output_dir(argv)
    _hydra_main()


if __name__ == "__main__":
    main()
