"""Fixtures of the fault-tolerance tests: the uninterrupted tiny run every interrupted one is compared with."""

from __future__ import annotations

import pytest

from tests.fault.helpers import TINY, train


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """The tiny run (2 epochs of 19 steps) from start to end, once per session."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, log = train(*TINY, f"paths.output_dir={out}")
    assert rc == 0, log[-3000:]
    return out
