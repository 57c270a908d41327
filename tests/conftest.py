"""Shared test helpers: paths to the repo, its configs and the shared real datasets."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = Path(os.environ.get("VITLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


class SyncRecorder:
    """``with SyncRecorder() as rec: ...`` records the ATen ops run inside that would make the host wait for the
    device (:data:`vitlab.lit.host_sync.SYNC_OPS`: .item(), bool(tensor), data-dependent shapes); on a CPU they
    prove what a GPU run would do. ``rec.seen`` lists them."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from vitlab.lit.host_sync import SYNC_OPS

        recorder = self
        self.seen: list[str] = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kw = kwargs or {}
                repeats_sync = func is torch.ops.aten.repeat_interleave.Tensor and kw.get("output_size") is None
                if func in SYNC_OPS or func.overloadpacket in SYNC_OPS or repeats_sync:
                    recorder.seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> "SyncRecorder":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def new_file_mode(folder: Path) -> int:
    """The permission bits a plain open(..., 'w') gives a new file in ``folder`` (0o666 less the umask)."""
    import stat

    probe = folder / "plain-open-probe"
    probe.write_text("x")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def run_cli(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` from the repo root; return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", **(env or {})}
    if os.environ.get("PYTEST_XDIST_WORKER"):      # tests run 2 at a time (pytest -n 2): one thread per process
        full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


@pytest.fixture
def cifar_subset() -> Path:
    root = SHARED_DATA / "cifar10-subset"
    if not (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"the shared CIFAR-10 subset is not at {root} (set VITLAB_SHARED_DATA)")
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tests use tiny tensors: one intra-op thread is fastest, and it stays fast when the CPU is shared
    (OpenMP workers spinning against other processes make each small op ~100x slower).
    Subprocess runs (tests/e2e) are unaffected."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass                      # clients that hang up early (a redirect probe reads headers only) are fine


@pytest.fixture
def http_serve(monkeypatch):
    """``http_serve(folder) -> base url``: serve a folder on 127.0.0.1 from a background thread; shut down after."""
    for var in ("no_proxy", "NO_PROXY"):                 # never send the local requests through a proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    servers = []

    def start(folder: Path) -> str:
        server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
