"""What a run ran on: library versions, vitlab's commit, the hardware, and what every rank trained with.

vitlab-train writes :func:`environment_record` to ``<run>/environment.json`` when training starts, so a number
can be traced to the code (``vitlab.git_sha``, ``dirty``), the kernels (CUDA, cuDNN, NCCL, flash-attn) and the
machines that produced it. ``ranks`` lists every process of a distributed run (host, pid, device, and a sha256
of the resolved config it trains with): one distinct ``config_sha256`` means every rank trained the same config.

Nothing here may fail a run: what cannot be read is recorded as ``"unknown"`` (or ``"not installed"``).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# distribution names (importlib.metadata), in the order a reader looks for them
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "lightning", "hydra-core", "omegaconf", "timm", "numpy",
            "flash-attn", "torchmetrics", "submitit")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run(cmd: list[str], cwd: Optional[Path] = None, timeout: float = 5.0) -> Optional[str]:
    """stdout of a short command, or None when it is missing, fails or takes too long (a hung NFS mount)."""
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_info(root: Optional[Path] = None) -> dict:
    """The commit of the checkout vitlab is imported from: ``sha``, ``dirty`` (tracked or untracked changes) and
    ``root``. Only when that checkout's top level is vitlab's own source tree: a vitlab installed into a
    site-packages that happens to sit inside another repository must not report that repository's commit."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=root)
    sha = _run(["git", "rev-parse", "HEAD"], cwd=root) if top else None
    if not top or not sha or Path(top).resolve() != root.resolve():
        return {"sha": UNKNOWN, "dirty": None, "root": str(root)}
    status = _run(["git", "status", "--porcelain"], cwd=root)
    return {"sha": sha, "dirty": None if status is None else bool(status), "root": str(root)}


def config_sha256(config: Any) -> str:
    """A stable hash of a resolved config (a mapping of plain values): equal configs, equal hashes, on any host."""
    if hasattr(config, "_metadata"):                                # a DictConfig: its resolved values
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def _ram_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_driver() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else UNKNOWN


def gpus() -> list[dict]:
    """Every visible CUDA device: name, memory, compute capability (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                    "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": int(p.multi_processor_count)})
    return out


def _torch_versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nccl = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except Exception:                                         # built without NCCL
            nccl = None
    return {"version": torch.__version__, "git_version": getattr(torch.version, "git_version", UNKNOWN),
            "cuda": torch.version.cuda, "cudnn": cudnn, "nccl": nccl, "hip": getattr(torch.version, "hip", None),
            "cuda_available": torch.cuda.is_available()}


def _dist_world() -> tuple[int, int, Optional[str]]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    return 0, 1, None


def rank_entry(trainer: Any = None, config: Any = None) -> dict:
    """This process's line of ``ranks``: where it runs and which config it trains with."""
    rank, _, _ = _dist_world()
    entry = {"rank": int(getattr(trainer, "global_rank", rank)), "local_rank": int(getattr(trainer, "local_rank", 0)),
             "node_rank": int(getattr(trainer, "node_rank", 0)), "hostname": socket.gethostname(), "pid": os.getpid()}
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    entry["device"] = str(device) if device is not None else "cpu"
    if device is not None and getattr(device, "type", None) == "cuda":
        entry["device_name"] = torch.cuda.get_device_name(device)
    entry["config_sha256"] = config_sha256(config) if config is not None else None
    return entry


def gather_ranks(entry: dict) -> list[dict]:
    """Every rank's entry, in rank order (a collective: all ranks call it); just ``[entry]`` in a single process,
    with no communication."""
    import torch.distributed as dist

    _, world, _ = _dist_world()
    if world == 1:
        return [entry]
    entries: list[Any] = [None] * world
    dist.all_gather_object(entries, entry)
    return sorted(entries, key=lambda e: e["rank"])


def environment_record(trainer: Any = None, config: Any = None) -> dict:
    """The whole record (a JSON-able dict). With ``torch.distributed`` initialised it gathers every rank's entry,
    so every rank must call it at the same point (vitlab-train does, when fit starts); the ranks' duplicated
    parts (versions, hardware) are this process's."""
    import vitlab

    _, world, backend = _dist_world()
    record = {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "torch": _torch_versions(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "vitlab": {"version": getattr(vitlab, "__version__", UNKNOWN), **git_info()},
        "hardware": {"hostname": socket.gethostname(), "cpu": cpu_model(), "logical_cores": os.cpu_count(),
                     "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                     "ram_bytes": _ram_bytes(), "gpus": gpus(),
                     "nvidia_driver": _nvidia_driver() if torch.cuda.is_available() else None},
        "distributed": {"world_size": int(getattr(trainer, "world_size", world) or world), "backend": backend,
                        "num_nodes": int(getattr(trainer, "num_nodes", 1) or 1)},
    }
    if trainer is not None:
        record["trainer"] = {"strategy": type(trainer.strategy).__name__,
                             "accelerator": type(trainer.accelerator).__name__,
                             "precision": str(getattr(trainer, "precision", UNKNOWN))}
    record["ranks"] = gather_ranks(rank_entry(trainer, config))
    return record


def summary(record: Mapping) -> str:
    """One line for the log: versions, commit, hardware, ranks, and whether every rank has the same config."""
    t, hw, ranks = record["torch"], record["hardware"], record["ranks"]
    sha = record["vitlab"]["sha"]
    sha = sha[:10] + ("+dirty" if record["vitlab"].get("dirty") else "") if sha != UNKNOWN else sha
    devices = f"{len(hw['gpus'])} x {hw['gpus'][0]['name']}" if hw["gpus"] else f"CPU ({hw['logical_cores']} cores)"
    hashes = {r.get("config_sha256") for r in ranks}
    same = "the same config" if len(hashes) == 1 else f"{len(hashes)} DIFFERENT configs"
    return (f"torch {t['version']} (CUDA {t['cuda']}, cuDNN {t['cudnn']}), flash-attn "
            f"{record['packages']['flash-attn']}, vitlab {sha}; {hw['hostname']}: {devices}; "
            f"{len(ranks)} rank(s) on {len({r['hostname'] for r in ranks})} host(s), {same}")
