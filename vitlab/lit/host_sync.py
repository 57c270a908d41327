"""Host-synchronisation guard: finds the places where a training step makes the host wait for the device.

:class:`HostSyncGuard` watches every training step that is not a logging step (the window from
``on_train_batch_start`` to Lightning's step-metric update) and reports each op that would stall a GPU run:
through a TorchDispatchMode on any device, and ``torch.cuda.set_sync_debug_mode`` on CUDA. Enable it with
``callbacks.host_sync_guard='{_target_: vitlab.lit.host_sync.HostSyncGuard, mode: error}'``.
:func:`is_logging_step` is Lightning's own rule for when step metrics are written; vitlab reads values back
to the host only on those steps.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)


# ------------------------------------------------------------ logging steps ---

def training_batch_number(trainer: pl.Trainer) -> int:
    """1-based number of the current training batch in Lightning's logging count (``batches_that_stepped + 1``):
    the count Lightning's ``log_every_n_steps`` rule uses; it survives resumes (it is in the loop's state)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    done = getattr(loop, "_batches_that_stepped", None)
    return (int(done) if done is not None else int(trainer.global_step)) + 1


def is_logging_step(trainer: pl.Trainer) -> bool:
    """True on the training batches where Lightning writes ``on_step`` metrics to its loggers.

    Lightning 2.6 (``_LoggerConnector.should_update_logs``): when ``(batches_that_stepped + 1) %
    log_every_n_steps == 0`` or ``trainer.should_stop``; never when ``log_every_n_steps=0``; every batch under
    ``fast_dev_run``. It does not log step metrics on the last batch of an epoch (the epoch metrics are computed
    after the training step, outside it). Valid from ``on_train_batch_start`` to ``on_train_batch_end``:
    ``batches_that_stepped`` only moves after them. The micro-batches of a logging step under gradient
    accumulation all count as logging steps (the count moves once per optimizer step).
    """
    if trainer.fast_dev_run:
        return True
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(type(connector), "should_update_logs"):
        return bool(connector.should_update_logs)
    n = int(trainer.log_every_n_steps)
    return bool(trainer.should_stop) or (n > 0 and training_batch_number(trainer) % n == 0)


# ---------------------------------------------------------- host sync guard ---
# ATen ops that make the host wait for device data on CUDA (the op returns a Python value, or the size of its
# output depends on the data, so the host must read the device before it can go on). The guard sees them at the
# dispatcher, on any device: on a CPU run it reports where a GPU run would stall. Composite ops are seen as what
# they decompose into: bool(t), int(t), float(t), f"{t:.3f}", `if t:` and `t > 0 and ...` all reach
# _local_scalar_dense; torch.where(cond) / argwhere reach nonzero; torch.unique reaches _unique2.
_aten = torch.ops.aten
SYNC_OPS: dict[Any, str] = {
    _aten._local_scalar_dense: "reads a tensor's value on the host (.item(), bool(), int(), float(), `if tensor`)",
    _aten.item: "reads a tensor's value on the host (.item())",
    _aten.is_nonzero: "reads a tensor's value on the host (bool(tensor))",
    _aten.equal: "torch.equal returns a Python bool",
    _aten.allclose: "torch.allclose returns a Python bool",
    _aten.nonzero: "the output's size depends on the data (nonzero, argwhere, torch.where(cond))",
    _aten.masked_select: "the output's size depends on the data",
    _aten._unique: "the output's size depends on the data (torch.unique)",
    _aten._unique2: "the output's size depends on the data (torch.unique)",
    _aten.unique_dim: "the output's size depends on the data (torch.unique(dim=))",
    _aten.unique_consecutive: "the output's size depends on the data",
    _aten.unique_dim_consecutive: "the output's size depends on the data",
    _aten.bincount: "the CUDA kernel reads the input's min and max to size its output",
    _aten._linalg_check_errors: "reads LAPACK error codes back (torch.linalg.* without _ex)",
}
# Only with some arguments (see HostSyncGuard._sync_reason): index / index_put(_) with a bool mask (x[mask], a
# nonzero inside the kernel), repeat_interleave(repeats tensor) without output_size, histc with min == max (reads
# the data's range), _to_copy / copy_ from the device to the host without non_blocking (.cpu(), .to("cpu")).
# Not syncs, deliberately absent: _assert_async (a device-side assert), nonzero_static (fixed output size),
# any / all / isfinite / where(cond, a, b) (their results stay on the device), clip_grad_norm_ without
# error_if_nonfinite. Syncs inside a kernel's C++ code (e.g. embedding backward on CUDA) never reach the
# dispatcher: on CUDA, torch.cuda.set_sync_debug_mode reports those too.
_MASK_INDEX_OPS = (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_)
_CUDA_SYNC_TEXT = "synchronizing CUDA operation"



def _is_masked_fill(packet: Any, args: tuple, kwargs: dict) -> bool:
    """``x[mask] = scalar``: ATen's ``index_put_`` runs it as ``masked_fill_`` (no nonzero, no sync) when it is not
    accumulating, its one index is a boolean mask over ``x``'s leading dimensions on ``x``'s device, and the value
    is one number on the host (ATen's ``canDispatchToMaskedFill``). Whether Python's ``x[mask] = 1.0`` reaches the
    dispatcher as ``index_put_`` or as ``masked_fill_`` depends on the torch version (2.14 sends ``index_put_``);
    either way it stays on the device."""
    if packet is _aten.index:
        return False
    self_, indices = args[0], (args[1] if len(args) > 1 else kwargs.get("indices", ()))
    value = args[2] if len(args) > 2 else kwargs.get("values")
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    defined = [i for i in indices or () if i is not None]
    if accumulate or len(defined) != 1 or len(indices) != 1:
        return False
    mask = defined[0]
    return (isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu"
            and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.device == self_.device
            and tuple(mask.shape) == tuple(self_.shape[:mask.ndim]))

@dataclass(frozen=True)
class HostSync:
    """One host synchronisation seen inside the training step.

    ``location`` / ``function``: the first frame outside torch and its libraries, e.g. the line of your
    ``training_step`` that called ``.item()``; when the sync comes from Lightning's own per-step code,
    ``in_lightning`` is True and ``location`` is the innermost Lightning frame. ``via``: the library or
    Lightning frames between it and torch (the call chain that reached the op), "" when none.
    """

    step: int
    op: str
    reason: str
    location: str
    function: str
    in_lightning: bool = False
    via: str = ""

    def where(self) -> str:
        text = f"{self.location} in {self.function}"
        if self.in_lightning:
            text = f"inside Lightning: {text}"
        return f"{text} (via {self.via})" if self.via else text


def _dir_of(module: Any) -> str:
    return os.path.dirname(module.__file__) + os.sep


# the vitlab package's folder (not `import vitlab`: the root package imports vitlab.lit lazily)
_VITLAB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")


def _library_dirs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]:
    """(torch dirs, Lightning dirs, other library dirs, vitlab dir) for sorting stack frames."""
    import sysconfig

    import lightning_fabric

    lightning = [_dir_of(pl), _dir_of(lightning_fabric)]
    try:
        import lightning as lightning_pkg

        lightning.append(_dir_of(lightning_pkg))
    except ImportError:
        pass
    paths = sysconfig.get_paths()
    libs = {os.path.join(paths[k], "") for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    return (_dir_of(torch),), tuple(lightning), tuple(sorted(libs, key=len, reverse=True)), _VITLAB_DIR


def _short_path(path: str, libs: tuple[str, ...]) -> str:
    """A library file relative to its site-packages ("pytorch_lightning/..."), a project file relative to the
    working directory ("vitlab/recipes/x.py"), else the path as it is."""
    for lib in libs:
        if path.startswith(lib):
            return path[len(lib):]
    return path.removeprefix(os.path.join(os.getcwd(), ""))


def _watched_reader(guard: HostSyncGuard, name: str, original: Callable) -> Callable:
    """``Tensor.<name>`` that reports a host read to ``guard`` while its window is open on this thread."""

    def reader(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if guard._detector is not None and not guard._failed and not guard._paused \
                and threading.get_ident() == guard._thread and guard._counts(t):
            guard._on_sync(f"Tensor.{name}", "reads a tensor's data on the host", sys._getframe(1))
        return original(t, *args, **kwargs)

    reader.__name__ = reader.__qualname__ = name
    return reader


class _SyncDetector(TorchDispatchMode):
    """Sees every ATen op run on this thread while the guard's window is open and reports the syncs."""

    def __init__(self, guard: HostSyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.guard._failed and not self.guard._paused:
            reason = self.guard._sync_reason(func, args, kwargs)
            if reason is not None:
                self.guard._on_sync(str(func.overloadpacket), reason, sys._getframe(1))
        return func(*args, **kwargs)


_DISPATCH_CODE = _SyncDetector.__torch_dispatch__.__code__


class HostSyncGuard(pl.Callback):
    """Proves the training step never makes the host wait for the device outside logging intervals.

    From ``on_train_batch_start`` until Lightning has finished the batch (forward, loss, backward, gradient
    clipping, optimizer and scheduler steps, every callback's ``on_train_batch_end`` and Lightning's own
    per-batch metric bookkeeping), a :class:`~torch.utils._python_dispatch.TorchDispatchMode` watches every
    ATen op for the ones that need the device's data on the host (:data:`SYNC_OPS`: ``.item()``, ``bool()``,
    data-dependent shapes, device-to-host copies). It works on any device, so a CPU test proves what a GPU run
    would do; on CUDA, ``torch.cuda.set_sync_debug_mode`` is also set for the window to catch the syncs inside
    kernels. On a CPU run every tensor stands for a device tensor, except the optimizers' per-parameter
    ``state["step"]`` counters, which live on the host on a GPU too (non-fused optimizers) and are allowed; on a
    GPU run only tensors on the training device count.

    Steps where Lightning logs (:func:`is_logging_step`) are not watched when ``skip_logging_steps``: reading
    values back there is what logging does. Nor is writing a checkpoint (``trainer.save_checkpoint`` and the
    checkpoint callbacks' ``on_train_batch_end``): it reads everything back by nature. Nor are the first
    ``warmup_steps`` batches of a fit: one-time set-up copies host data to the device there (Lightning
    registers each logged key and moves its state to the device on the step that first logs it), which
    costs nothing per step.

    ``mode``: ``"error"`` raises a RuntimeError naming the op, the line and the step; ``"warn"`` logs each
    location once; ``"count"`` only records. Every mode records into :attr:`syncs`; :meth:`summary` groups
    them. ``windows`` counts the steps watched.

    The guard moves itself to the front of ``trainer.callbacks`` so the window opens before any other
    callback's ``on_train_batch_start``. Watching costs a Python call per ATen op: a debugging and CI tool,
    not for long runs. Under DDP each rank watches its own steps (the collectives of ``sync_dist=True`` and
    DDP's gradient all-reduce are not host syncs and are not reported).
    """

    def __init__(self, mode: Literal["count", "warn", "error"] = "error", skip_logging_steps: bool = True,
                 warmup_steps: int = 1, cuda_sync_debug: bool = True):
        if mode not in ("count", "warn", "error"):
            raise ValueError(f"HostSyncGuard mode must be count, warn or error, got {mode!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"HostSyncGuard warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.mode = mode
        self.skip_logging_steps = skip_logging_steps
        self.warmup_steps = warmup_steps
        self.cuda_sync_debug = cuda_sync_debug
        self.syncs: list[HostSync] = []
        self.windows = 0
        self._batches = 0                                # training batches started in this fit
        self._warned: set[str] = set()
        self._trainer: Optional[pl.Trainer] = None
        self._detector: Optional[_SyncDetector] = None
        self._step = 0
        self._device = torch.device("cpu")
        self._host_counters: set[int] = set()
        self._failed = False
        self._paused = 0                                 # > 0 while a checkpoint is being written
        self._error: Optional[str] = None
        self._cuda_prev: Optional[int] = None
        self._cuda_mode = "error"
        self._warn_ctx: Any = None
        self._patched: dict[str, Any] = {}
        self._thread = 0
        self._dirs: Any = None

    def __getstate__(self) -> dict:
        # sent to spawned DDP processes before fit: without the run-time state of a window
        state = dict(vars(self))
        state.update(_trainer=None, _detector=None, _warn_ctx=None, _patched={}, _dirs=None)
        return state

    # ------------------------------------------------------------ wiring ---
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer, self._batches = trainer, 0
        # First in the list: the window opens before the other callbacks' on_train_batch_start. Rebinding (not
        # mutating) the list is safe while Lightning iterates the old one to call this hook.
        trainer.callbacks = [self] + [cb for cb in trainer.callbacks if cb is not self]
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and callable(getattr(connector, "update_train_step_metrics", None)):
            original = connector.update_train_step_metrics

            def update_train_step_metrics(*args: Any, **kwargs: Any) -> Any:
                try:                                    # Lightning's last per-batch work: close the window after it
                    return original(*args, **kwargs)
                finally:
                    self._close(raise_pending=True)
            update_train_step_metrics.__vitlab_guard__ = True
            connector.update_train_step_metrics = update_train_step_metrics
        # Writing a checkpoint reads everything back (and names its file from metric values): a sync point by
        # nature, not watched, whether a checkpoint callback or any other code writes it.
        trainer.save_checkpoint = self._unwatched(trainer.save_checkpoint)
        for cb in trainer.callbacks:
            if isinstance(cb, Checkpoint):
                cb.on_train_batch_end = self._unwatched(cb.on_train_batch_end)

    def _unwatched(self, fn: Callable) -> Callable:
        """``fn`` with the guard paused while it runs (marked so teardown can remove it)."""

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self._pause(+1)
            try:
                return fn(*args, **kwargs)
            finally:
                self._pause(-1)
        call.__vitlab_guard__ = True
        return call

    def _pause(self, delta: int) -> None:
        self._paused += delta
        if self._cuda_prev is not None and self._paused == (1 if delta > 0 else 0):
            torch.cuda.set_sync_debug_mode(self._cuda_prev if delta > 0 else self._cuda_mode)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(raise_pending=False)
        self._unwrap(trainer)

    @staticmethod
    def _unwrap(trainer: pl.Trainer) -> None:
        owners = [(getattr(trainer, "_logger_connector", None), "update_train_step_metrics"),
                  (trainer, "save_checkpoint")] + [(cb, "on_train_batch_end") for cb in trainer.callbacks]
        for owner, name in owners:
            if owner is not None and getattr(vars(owner).get(name), "__vitlab_guard__", False):
                delattr(owner, name)

    # ------------------------------------------------------------ window ---
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._close(raise_pending=True)                  # a window left open (a skipped rest of epoch)
        self._batches += 1
        if self._batches <= self.warmup_steps or (self.skip_logging_steps and is_logging_step(trainer)):
            return
        self._open(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        connector = getattr(trainer, "_logger_connector", None)
        if not getattr(getattr(connector, "update_train_step_metrics", None), "__vitlab_guard__", False):
            self._close(raise_pending=True)              # no hook after Lightning's bookkeeping: close here

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(raise_pending=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(raise_pending=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(raise_pending=False)
        self._unwrap(trainer)                            # Lightning calls no teardown hook after an exception

    def _open(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = int(trainer.global_step)
        self._device = pl_module.device
        self._host_counters = self._optimizer_counters()
        self._failed, self._error = False, None
        self._thread = threading.get_ident()
        self.windows += 1
        if self._device.type == "cuda" and self.cuda_sync_debug:
            self._cuda_prev = torch.cuda.get_sync_debug_mode()
            self._cuda_mode = "error" if self.mode == "error" else "warn"
            if self.mode != "error":
                self._watch_cuda_warnings()
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
        if self._device.type == "cpu":
            self._patch_host_readers()
        self._detector = _SyncDetector(self)
        self._detector.__enter__()

    def _close(self, raise_pending: bool) -> None:
        if self._detector is not None:
            detector, self._detector = self._detector, None
            detector.__exit__(None, None, None)
            if self._cuda_prev is not None:
                torch.cuda.set_sync_debug_mode(self._cuda_prev)
                self._cuda_prev = None
            if self._warn_ctx is not None:
                ctx, self._warn_ctx = self._warn_ctx, None
                ctx.__exit__(None, None, None)
            self._unpatch_host_readers()
        error, self._error = self._error, None
        if error is not None and raise_pending:
            raise RuntimeError(error)                    # raised in the step but swallowed by a try/except there

    # ---------------------------------------------------------- detection ---
    def _counts(self, t: Any) -> bool:
        """Whether reading ``t`` on the host waits for the device (see the class docstring)."""
        if not isinstance(t, torch.Tensor) or t.device != self._device:
            return False
        if self._device.type != "cpu":
            return True
        if id(t) in self._host_counters:
            return False
        self._host_counters = self._optimizer_counters()   # counters are created inside the first optimizer.step
        return id(t) not in self._host_counters

    def _optimizer_counters(self) -> set[int]:
        """ids of the optimizers' host-side step counters (created lazily inside the first optimizer.step)."""
        ids: set[int] = set()
        for opt in getattr(self._trainer, "optimizers", None) or []:
            for state in opt.state.values():
                step = state.get("step") if isinstance(state, dict) else None
                if isinstance(step, torch.Tensor):
                    ids.add(id(step))
        return ids

    def _sync_reason(self, func: Any, args: tuple, kwargs: dict) -> Optional[str]:
        if threading.get_ident() != self._thread:
            return None
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            return SYNC_OPS[packet] if any(self._counts(a) for a in args) else None
        if packet in _MASK_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if self._counts(args[0]) and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                             for i in indices or ()) and not _is_masked_fill(packet, args, kwargs):
                return "indexing with a boolean mask: the selected size depends on the data (nonzero inside)"
            return None
        if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.Tensor:
            if kwargs.get("output_size") is None and self._counts(args[0]):
                return "repeat_interleave(tensor) without output_size: the output's size depends on the data"
            return None
        if packet is _aten.histc:
            lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
            hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
            return "histc with min == max reads the data's range" if lo == hi and self._counts(args[0]) else None
        if self._device.type != "cpu" and packet in (_aten._to_copy, _aten.copy_):
            return self._copy_reason(packet, args, kwargs)
        return None

    def _copy_reason(self, packet: Any, args: tuple, kwargs: dict) -> Optional[str]:
        if packet is _aten._to_copy:
            src, dst = args[0], kwargs.get("device")
            blocking = not kwargs.get("non_blocking", False)
            to_host = dst is not None and torch.device(dst).type == "cpu"
        else:
            dst_t, src = args[0], args[1]
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            to_host = isinstance(dst_t, torch.Tensor) and dst_t.device.type == "cpu"
        if to_host and blocking and self._counts(src):
            return "copies device data to the host (.cpu(), .to('cpu'), .numpy(), .tolist())"
        return None

    def _on_sync(self, op: str, reason: str, frame: Any) -> None:
        location, function, in_lightning, via = self._attribute(frame)
        sync = HostSync(self._step, op, reason, location, function, in_lightning, via)
        self.syncs.append(sync)
        if self.mode == "warn" and sync.where() not in self._warned:
            self._warned.add(sync.where())
            log.warning("host sync in the training step at step %d: %s (%s) from %s", sync.step, op, reason,
                        sync.where())
        elif self.mode == "error":
            n = getattr(self._trainer, "log_every_n_steps", None)
            fix = ("it is Lightning's own per-step work: see the HostSyncGuard notes in vitlab/lit/callbacks.py"
                   if in_lightning else
                   f"move it to a logging interval (vitlab.lit.callbacks.is_logging_step; every "
                   f"trainer.log_every_n_steps={n} steps) or keep the value on the device")
            self._error = (f"host sync in the training step at step {sync.step}: {op} from {sync.where()}; "
                           f"{reason}. Fix: {fix}.")
            self._failed = True                          # let the rest pass, so the error handling can run
            raise RuntimeError(self._error)

    def _attribute(self, frame: Any) -> tuple[str, str, bool, str]:
        """(file:line, function, in Lightning?, via) for the code that caused the sync (see :class:`HostSync`)."""
        if self._dirs is None:
            self._dirs = _library_dirs()
        torch_dirs, lightning_dirs, lib_dirs, vitlab_dir = self._dirs
        chain: list[tuple[str, Any]] = []                # (kind, frame), innermost first, torch frames dropped
        f = frame
        while f is not None:
            code = f.f_code
            path = code.co_filename
            if code is _DISPATCH_CODE or path.startswith(torch_dirs):
                kind = None
            elif path.startswith(vitlab_dir):
                kind = "user"
            elif path.startswith(lightning_dirs):
                kind = "lightning"
            elif path.startswith((*lib_dirs, "<")):
                kind = "library"
            else:
                kind = "user"
            if kind is not None:
                chain.append((kind, f))
            f = f.f_back

        def describe(fr: Any) -> str:
            return f"{_short_path(fr.f_code.co_filename, lib_dirs)}:{fr.f_lineno}"

        def named(fr: Any) -> str:
            return f"{describe(fr)} in {fr.f_code.co_name}"

        for i, (kind, fr) in enumerate(chain):
            # user code counts when it runs under the Trainer (a Lightning frame further out): a hook, a recipe,
            # a callback; the line that called trainer.fit() is not the culprit
            if kind == "user" and any(k == "lightning" for k, _ in chain[i + 1:]):
                via = " <- ".join(named(g) for _, g in chain[:i][:3])
                return describe(fr), fr.f_code.co_name, False, via
        inner = [fr for kind, fr in chain if kind == "lightning"]
        if inner:
            # the call chain inside Lightning, one frame per file (the helpers first, the loop that calls them last)
            outer, files = [], {inner[0].f_code.co_filename}
            for fr in inner[1:]:
                if fr.f_code.co_filename not in files:
                    files.add(fr.f_code.co_filename)
                    outer.append(named(fr))
            return describe(inner[0]), inner[0].f_code.co_name, True, " <- ".join(outer[:4])
        if chain:
            return describe(chain[0][1]), chain[0][1].f_code.co_name, False, ""
        return "<unknown>", "?", False, ""

    # ------------------------------------------- .tolist() / .numpy() on CPU ---
    def _patch_host_readers(self) -> None:
        """On a CPU run ``.tolist()`` and ``.numpy()`` read the data without an ATen op: watch them directly
        (on a GPU they are device-to-host copies, which the dispatcher sees)."""
        for name in ("tolist", "numpy"):
            self._patched[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, _watched_reader(self, name, getattr(torch.Tensor, name)))

    def _unpatch_host_readers(self) -> None:
        for name, previous in self._patched.items():
            if previous is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, previous)
        self._patched = {}

    # --------------------------------------------------------------- CUDA ---
    def _watch_cuda_warnings(self) -> None:
        """Record torch.cuda's sync-debug warnings (every one, not once per line) as syncs."""
        guard = self
        self._warn_ctx = warnings.catch_warnings()
        self._warn_ctx.__enter__()
        warnings.filterwarnings("always", message=f".*{_CUDA_SYNC_TEXT}")
        shown = warnings.showwarning

        def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                        line: Any = None) -> None:
            if _CUDA_SYNC_TEXT in str(message) and guard._detector is not None and not guard._paused:
                guard._on_sync("cuda-sync", "a synchronizing CUDA call (torch.cuda.set_sync_debug_mode)",
                               sys._getframe(1))
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = showwarning

    # ------------------------------------------------------------- report ---
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("host sync guard: %s", self.summary())

    def summary(self) -> str:
        """One line per (op, location) with its count and steps, most frequent first."""
        if not self.syncs:
            return f"no host syncs in {self.windows} watched training steps"
        groups: dict[tuple[str, str], list[int]] = {}
        for s in self.syncs:
            groups.setdefault((s.op, s.where()), []).append(s.step)
        lines = [f"{len(self.syncs)} host syncs in {self.windows} watched training steps:"]
        for (op, where), steps in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
            lines.append(f"  {len(steps)} x {op} from {where} (steps {shown})")
        return "\n".join(lines)
