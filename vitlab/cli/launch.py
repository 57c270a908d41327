"""vitlab-train as several processes: one run directory, and every rank trains rank 0's resolved config.

Three ways a run becomes several processes; in each, only rank 0 runs Hydra (composes, makes the run directory,
interpolates ``${now:...}``) and the other ranks take its resolved config:

1. Lightning starts them (``trainer=ddp trainer.devices=N``, one command). Lightning's launcher re-runs the
   command line in each child, which under Hydra would compose again: a multirun's ``-m a,b`` would start a sweep
   per child, ``${now:}`` would differ, each child would make a directory. Instead rank 0 writes
   ``<run>/config.yaml`` before fit and names it in :data:`FROZEN_CONFIG`; a child (:func:`is_spawned_child`)
   loads it and trains, without Hydra. :func:`job` brackets fit + test so that the next job of a multirun starts
   clean: Lightning's MASTER_PORT / LOCAL_RANK / WORLD_SIZE removed from the environment (with LOCAL_RANK left
   set, the next job's Lightning would think an outside launcher made its processes and wait for them), the
   children reaped and the process group destroyed.
2. An outside launcher starts them all (torchrun, or srun with several tasks). Every rank checks the command line
   (a bad key fails everywhere at once), then :func:`run_ranks` joins the launch's key-value store; rank 0 runs
   Hydra (a run or a multirun) and hands each job's resolved config to the others through the store; the others
   train each config they receive until rank 0 says it is done (also when it failed: they exit with its code
   instead of waiting). The process group is opened at the first job, with the backend its devices need, and
   stays open across a multirun's jobs; Lightning finds it open and uses it.
3. submitit runs Hydra's job function in every task (``hydra/launcher=slurm`` with several tasks per node,
   or ``hydra/launcher=submitit_local``): :func:`shared_config` joins the store inside the job and every task
   takes rank 0's config.

How long a rank waits for the others (the store, the group's collectives, rank 0's next job) is
``$VITLAB_DIST_TIMEOUT_MIN`` minutes (default 30): the store is joined before any config is read, so it cannot be
a config key.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from vitlab.cli.common import fail

if TYPE_CHECKING:
    import pytorch_lightning as pl

# torch and Lightning are imported where they are used: a bad key on the command line fails in a fraction of a
# second, before they load.

log = logging.getLogger("vitlab")

FROZEN_CONFIG = "VITLAB_FROZEN_CONFIG"      # rank 0's resolved config, for the processes Lightning starts
TIMEOUT_ENV = "VITLAB_DIST_TIMEOUT_MIN"
_JOB_KEY = "job/{}"                          # rank 0 -> the others: job n's config (YAML), or _STOP + exit code
_EXIT_KEY = "exit/{}"                        # rank r -> rank 0: r has read the stop and is leaving
_STOP = "vitlab-stop:"
_EXIT_WAIT = datetime.timedelta(seconds=60)  # rank 0 waits this long for the others to read its stop
_REAP_TIMEOUT_S = 120                        # children still running this long after the job are killed


@dataclass
class Ranks:
    """Where this process sits in a run that an outside launcher started."""
    launcher: str               # torchrun | srun | submitit
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    local_world_size: int
    address: str
    port: int
    store_file: Optional[str] = None     # one machine: a file the ranks share (no port to collide with another's)

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


class _State:
    ranks: Optional[Ranks] = None   # set once this process joined an outside launcher's ranks (cases 2 and 3)
    store: Any = None               # the launch's key-value store
    backend: Optional[str] = None   # of the process group this process opened
    groups = 0                      # process groups opened so far
    jobs = 0                        # jobs sent (rank 0) or received (others)
    serving = False                 # a rank > 0 in run_ranks' loop: train() gets the received config


_state = _State()


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "30")
    try:
        minutes = float(raw)
    except ValueError:
        fail(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes; set it to e.g. 30")
    return datetime.timedelta(minutes=minutes)


def _int_env(name: str, default: int = 0) -> int:
    raw = os.environ.get(name, "")
    digits = raw.split("(", 1)[0]                # SLURM_NTASKS_PER_NODE reads like "4(x2)"
    return int(digits) if digits.isdigit() else default


# ------------------------------------------------------------ who am I ---

def external_ranks() -> Optional[Ranks]:
    """The ranks of a run torchrun or srun started with several processes; None for one process (or a child
    Lightning started, or a submitit task: those never reach :func:`run_ranks`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and _int_env("WORLD_SIZE", 1) > 1:     # as torch's own check
        from lightning_fabric.plugins.environments import TorchElasticEnvironment

        env = TorchElasticEnvironment()
        return Ranks("torchrun", env.global_rank(), env.world_size(), env.local_rank(), env.node_rank(),
                     _int_env("LOCAL_WORLD_SIZE", 1), env.main_address, env.main_port)
    if "SUBMITIT_EXECUTOR" not in os.environ and _int_env("SLURM_NTASKS", 1) > 1:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():        # not an interactive allocation (srun --job-name=interactive)
            return _slurm_ranks("srun")
    return None


def _slurm_ranks(launcher: str) -> Ranks:
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env = SLURMEnvironment()
    per_node = _int_env("SLURM_NTASKS_PER_NODE") or env.world_size() // max(1, _int_env("SLURM_NNODES", 1))
    # main_address / main_port also export MASTER_ADDR / MASTER_PORT, as Lightning does under SLURM
    return Ranks(launcher, env.global_rank(), env.world_size(), env.local_rank(), env.node_rank(), per_node,
                 env.main_address, env.main_port)


def submitit_ranks() -> Optional[Ranks]:
    """The ranks of a submitit job with several tasks (None otherwise). Under SLURM, Lightning reads them from
    srun's variables; submitit's local executor has none Lightning knows, so they are exported the way
    Lightning's own environment reads a run whose processes someone else started (LOCAL_RANK, NODE_RANK)."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor == "slurm" and _int_env("SLURM_NTASKS", 1) > 1:
        return _slurm_ranks("submitit")
    if executor != "local" or _int_env("SUBMITIT_LOCAL_NTASKS", 1) < 2:
        return None
    import submitit

    job = submitit.JobEnvironment()
    os.environ.update(LOCAL_RANK=str(job.local_rank), NODE_RANK="0")
    store = job.paths.folder / f"{job.job_id}_vitlab_store"          # the job's own submitit folder
    return Ranks("submitit", job.global_rank, job.num_tasks, job.local_rank, 0, job.num_tasks, "127.0.0.1", 0,
                 str(store))


def is_spawned_child() -> bool:
    """A DDP process that Lightning started for rank 0's job (it trains the config :data:`FROZEN_CONFIG` names)."""
    return bool(os.environ.get(FROZEN_CONFIG)) and _int_env("LOCAL_RANK") > 0


def _quiet_logging(rank: int) -> None:
    """Ranks > 0 run without Hydra's logging setup: warnings and errors only, marked with the rank."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def _config_from_yaml(text: str) -> DictConfig:
    cfg = OmegaConf.create(text)
    OmegaConf.set_struct(cfg, True)                # as Hydra hands it over: a typo in code is an error
    return cfg


def run_spawned_child(train: Callable[[DictConfig], Any]) -> None:
    """Train rank 0's frozen config in a child Lightning started; no Hydra, no directory, ``-m`` ignored."""
    path = Path(os.environ[FROZEN_CONFIG])
    _quiet_logging(_int_env("LOCAL_RANK"))
    try:
        text = path.read_text()
    except OSError as e:
        fail(f"cannot read rank 0's config {path} ({e}); the run directory must be readable by every process")
    train(_config_from_yaml(text))


# ------------------------------------------------------------ the group ---

def connect(ranks: Ranks) -> None:
    """Join the launch's key-value store (torchrun's agent store, or one rank 0 serves at MASTER_ADDR:MASTER_PORT):
    the configs travel through it. The process group itself is opened per job (:func:`_open_group`), once the
    config says which devices the job trains on."""
    import torch.distributed as dist

    if ranks.store_file:
        store = dist.FileStore(ranks.store_file, ranks.world_size)
        store.set_timeout(_timeout())
    else:
        os.environ.setdefault("MASTER_ADDR", ranks.address)
        os.environ.setdefault("MASTER_PORT", str(ranks.port))
        store, _, _ = next(dist.rendezvous("env://", rank=ranks.rank, world_size=ranks.world_size,
                                           timeout=_timeout()))
    # torchrun's store outlives a restart of its workers (--max-restarts): each attempt keeps to its own keys
    _state.store = dist.PrefixStore(f"vitlab/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    _state.ranks = ranks


def _backend(cfg: DictConfig) -> str:
    """gloo for a CPU run. On GPUs both: NCCL for CUDA tensors, gloo for CPU ones (object collectives, flags).
    Not the two for a CPU run on a GPU machine: Lightning averages with gloo's SUM + divide only when the
    backend is plain gloo."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return "cpu:gloo,cuda:nccl" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "gloo"


def _open_group(cfg: DictConfig) -> None:
    """The default process group for this job (every rank calls this at the same point of the same job); it stays
    open across a multirun's jobs while they need the same backend. Lightning finds it open and uses it."""
    import torch.distributed as dist

    backend = _backend(cfg)
    if dist.is_initialized():
        if _state.backend == backend:
            return
        dist.destroy_process_group()
    _state.groups += 1
    prefix = dist.PrefixStore(f"group/{_state.groups}", _state.store)     # fresh keys for each group
    dist.init_process_group(backend, store=prefix, rank=_state.ranks.rank, world_size=_state.ranks.world_size,
                            timeout=_timeout())
    _state.backend = backend


def _send(text: str) -> None:
    _state.store.set(_JOB_KEY.format(_state.jobs), text)
    _state.jobs += 1


def _receive() -> str:
    key = _JOB_KEY.format(_state.jobs)
    try:
        text = _state.store.get(key).decode()
    except RuntimeError as e:                 # torch's DistStoreError (a timeout, a store that went away)
        fail(f"rank {_state.ranks.rank} waited for rank 0's job {_state.jobs} and gave up ({e}): rank 0 failed or "
             f"stopped; if its jobs take longer than {_timeout()} to start, raise {TIMEOUT_ENV}")
    _state.jobs += 1
    return text


def run_ranks(ranks: Ranks, run_hydra: Callable[[], Any], train: Callable[[DictConfig], Any]) -> None:
    """torchrun / srun: join the store; rank 0 runs Hydra (``run_hydra``), the others ``train`` what it sends."""
    if ranks.rank > 0:
        _quiet_logging(ranks.rank)
    connect(ranks)
    if ranks.rank == 0:
        _lead(run_hydra)
    else:
        _serve(train)
    import torch.distributed as dist

    if dist.is_initialized():                 # a clean end (an error skips this: a peer may be gone)
        dist.destroy_process_group()


def _exit_code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def _lead(run_hydra: Callable[[], Any]) -> None:
    code = 1
    try:
        run_hydra()
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
        raise
    finally:
        _stop_others(code)


def _stop_others(code: int) -> None:
    """Tell the waiting ranks that rank 0 is done (``code``: its exit code, theirs too), then wait a little for
    them to read it: the store may live in this process (srun), and leaving first would cut them off."""
    world = _state.ranks.world_size
    try:
        _send(f"{_STOP}{code}")
        _state.store.wait([_EXIT_KEY.format(r) for r in range(1, world)], _EXIT_WAIT)
    except Exception as e:           # a rank that died, or a store already gone: nothing left to tell
        log.warning("distributed: not every rank confirmed the end of the run (%s)", e)


def _serve(train: Callable[[DictConfig], Any]) -> None:
    _state.serving = True
    code = 1
    try:
        while True:
            text = _receive()
            if text.startswith(_STOP):
                code = int(text[len(_STOP):])
                break
            train(_config_from_yaml(text))
    except SystemExit as e:
        code = _exit_code(e)
        raise
    finally:
        with contextlib.suppress(Exception):
            _state.store.set(_EXIT_KEY.format(_state.ranks.rank), str(code))
    if code:
        sys.exit(code)


# --------------------------------------------------------- one training job ---

def shared_config(cfg: DictConfig) -> DictConfig:
    """The config this process trains: its own on rank 0 (sent to the others when an outside launcher started
    the ranks), rank 0's on the others. Checks that the launched processes match trainer.devices x num_nodes,
    then opens the job's process group."""
    if _state.ranks is None:
        ranks = submitit_ranks()
        if ranks is None:
            _check_submitit_tasks(cfg)
            return cfg
        connect(ranks)
    ranks = _state.ranks
    if ranks.rank == 0:
        _send(OmegaConf.to_yaml(cfg, resolve=True))   # first: a bad value below then fails on every rank
    elif not _state.serving:                          # a submitit task: its own composition is set aside
        cfg = _config_from_yaml(_receive())
    _check_world(cfg, ranks)
    _open_group(cfg)
    if ranks.rank == 0 and _state.jobs == 1:
        log.info("distributed: %d processes on %d node(s) started by %s (backend %s)", ranks.world_size,
                 ranks.num_nodes, ranks.launcher, _state.backend)
    return cfg


def _check_submitit_tasks(cfg: DictConfig) -> None:
    """A submitit job is one task per device: Lightning cannot start more processes from inside it (it would
    re-run submitit's own entry point)."""
    devices = str(cfg.trainer.get("devices"))
    if os.environ.get("SUBMITIT_EXECUTOR") and devices.isdigit() and int(devices) > 1:
        fail(f"hydra/launcher=submitit_* runs one process per task, but trainer.devices={devices} with one task: "
             f"set hydra.launcher.tasks_per_node={devices} (hydra/launcher=slurm does this from trainer.devices)")


def _check_world(cfg: DictConfig, ranks: Ranks) -> None:
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if not str(devices).isdigit():                     # auto, a list of ids: Lightning checks those
        return
    if int(devices) != ranks.local_world_size or int(devices) * int(nodes) != ranks.world_size:
        fail(f"{ranks.launcher} started {ranks.world_size} processes ({ranks.local_world_size} per node on "
             f"{ranks.num_nodes} node(s)) but trainer.devices={devices} x trainer.num_nodes={nodes} asks for "
             f"{int(devices) * int(nodes)}: set trainer.devices={ranks.local_world_size} "
             f"trainer.num_nodes={ranks.num_nodes} (one process per device)")


def _children(trainer: "pl.Trainer") -> list[subprocess.Popen]:
    return list(getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or [])


def _stop_observers(procs: list[subprocess.Popen]) -> None:
    """Lightning watches its children from a thread that SIGKILLs this process when one exits non-zero; once the
    job is over (or failed, and Lightning killed them) that would kill the next job or this one's error report."""
    for thread in threading.enumerate():
        watched = getattr(thread, "_child_processes", None)
        if watched is not None and any(p in watched for p in procs):
            thread._child_processes = []         # its next look finds nothing left to watch and ends


def release_children(trainer: "pl.Trainer") -> None:
    """Stop watching this job's children now: a preempted job's children exit with 75 while rank 0 still requeues
    (scontrol, submitit's checkpoint), and the watcher would SIGKILL rank 0 before it is done."""
    _stop_observers(_children(trainer))


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.wait(timeout=_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("distributed: rank process %d still running %ds after the job; killing it", p.pid,
                      _REAP_TIMEOUT_S)
            p.kill()
            p.wait()


@contextlib.contextmanager
def job(trainer: "pl.Trainer", frozen_config: Path) -> Iterator[None]:
    """Bracket one job's fit and test: children Lightning starts read ``frozen_config``; after the job the
    environment is as before, the children have exited and a group Lightning opened is closed."""
    import torch.distributed as dist

    saved = dict(os.environ)
    had_group = dist.is_available() and dist.is_initialized()
    os.environ[FROZEN_CONFIG] = str(Path(frozen_config).resolve())
    try:
        yield
    finally:
        procs = _children(trainer)
        _stop_observers(procs)
        _reap(procs)
        for key in set(os.environ) | set(saved):       # MASTER_PORT, LOCAL_RANK, ... as before the job
            if key not in saved:
                del os.environ[key]
            elif os.environ.get(key) != saved[key]:
                os.environ[key] = saved[key]
        if not had_group and _state.ranks is None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
