"""Deprecated: vitlab.heads is vitlab.tasks (the Task contract, vitlab/tasks/base.py).

Kept so that configs and code written before the move still work (a user's conf/task/*.yaml naming
``vitlab.heads.ClassificationTask``, a Hydra rerun of an old run's ``.hydra/config.yaml``, ``from vitlab.heads
import ...``); every name resolves to vitlab.tasks with a DeprecationWarning. Checkpoints need none of this: their
stored configs are upgraded when loaded (vitlab.checkpoints.upgrade_config).
"""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    import vitlab.tasks

    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(vitlab.tasks, name)              # AttributeError for a name vitlab.tasks lacks too
    warnings.warn(f"vitlab.heads.{name} is deprecated: use vitlab.tasks.{name}", DeprecationWarning, stacklevel=2)
    return value
