"""Shared by the entry points: where the configs are, and checking a command line before any work."""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    """conf/ beside the package (editable install or source tree), or $VITLAB_CONFIG_DIR."""
    env = os.environ.get("VITLAB_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def fail(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"vitlab: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _keys_at(cfg: DictConfig, dotted: str) -> Optional[list[str]]:
    node = OmegaConf.select(cfg, dotted) if dotted else cfg
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None


def explain_composition_error(err: Exception, config_name: str, overrides: Sequence[str]) -> str:
    """Turn Hydra's composition errors into a message naming the problem and the valid choices."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    if cause is not None:
        text += "\n" + str(cause)
    m = re.search(r"Key '([^']+)' is not in struct\s+full_key: ([\w.\-\[\]]+)", text) or \
        re.search(r"Could not override '([\w.\-]+)'", text)
    if m and "not in struct" in text:
        full_key = m.group(2) if m.lastindex and m.lastindex >= 2 else m.group(1)
        parent, _, key = full_key.rpartition(".")
        cfg = _compose_without(config_name, overrides, full_key)
        valid = _keys_at(cfg, parent) if cfg is not None else None
        msg = f"unknown config key '{full_key}'."
        if valid:
            close = difflib.get_close_matches(key, valid, n=3)
            if close:
                msg += f" Did you mean {' or '.join(repr(f'{parent}.{c}' if parent else c) for c in close)}?"
            msg += f" Valid keys under '{parent or '<root>'}': {', '.join(sorted(valid))}."
        msg += f" (To add a new key on purpose, write +{full_key}=...)"
        return msg
    m = re.search(r"Could not find '([^']+)'", text)
    if m:
        group, _, option = m.group(1).rpartition("/")
        options = sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        return f"'{option}' is not an option of the config group '{group}'.{hint} Valid options: {', '.join(options)}."
    return text.strip()


def _compose_without(config_name: str, overrides: Sequence[str], bad_key: str) -> Optional[DictConfig]:
    from hydra import compose, initialize_config_dir

    rest = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(bad_key)]
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=config_name, overrides=rest)
    except Exception:
        return None


_SWEEP_VALUE = re.compile(r"^\s*(choice|range|interval|tag|glob)\(|,")


def validate_command_line(config_name: str, argv: Sequence[str]) -> None:
    """Compose the config from the command line once, before Hydra runs the job.

    A wrong group option or an unknown key stops here with a clear message and
    exit code 2. Multirun sweeps and Hydra's own flags are left to Hydra.
    """
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("hydra.") and not a.startswith("hydra/")]
    if any(a.startswith("hparams_search=") for a in overrides):
        # an Optuna sweep (hydra.mode=MULTIRUN from its config): search-space values such as choice(...) or
        # interval(...) are the sweeper's to parse; the other overrides are checked here as usual
        overrides = [a for a in overrides if not _SWEEP_VALUE.search(a.partition("=")[2])]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        fail(explain_composition_error(e, config_name, overrides))
