"""The one place vitlab decides which attention kernel runs.

Every transformer block calls :func:`attention`. The backend is chosen here,
once per process (and logged once with the reason), and can be overridden
globally (:func:`set_backend`), for a block of code (:func:`use_backend`) or
per call (``backend=``):

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``;
  on GPU torch picks the flash / cuDNN / memory-efficient kernel itself.
- ``math``: the plain reference, softmax(q k^T / sqrt(d)) v, in the input
  dtype with fp32 softmax. Every other backend is tested against it.
- ``flash_attn``: the flash-attn package (Dao et al.). Runs only for fp16/bf16
  CUDA tensors without an additional mask; asked for where it cannot run, it
  raises an error that says why.
- ``auto``: ``flash_attn`` where it can run, else ``sdpa``.

Tensors are laid out (B, H, N, Dh) on every backend.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "math", "flash_attn"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "math", "flash_attn")

_backend: str = os.environ.get("VITLAB_ATTN_BACKEND", "sdpa")
_logged: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> tuple[bool, str]:
    """Whether the flash-attn package can be used at all here, and why not.

    Cached: ``auto`` asks on every call, and a failed import searches sys.path each time.
    """
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False, "the flash-attn package is not installed (pip install flash-attn)"
    return True, "flash-attn installed and CUDA present"


def _flash_attn_reason(q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> Optional[str]:
    """None if flash_attn can run on these inputs, else the reason it cannot."""
    ok, why = flash_attn_available()
    if not ok:
        return why
    if not q.is_cuda:
        return "inputs are on the CPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"inputs are {q.dtype}; flash-attn needs float16 or bfloat16"
    if attn_mask is not None:
        return "an attention mask was given; flash-attn supports none"
    return None


def set_backend(name: Backend) -> None:
    """Choose the attention backend for the whole process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Temporarily run every attention call with ``name`` (tests, benchmarks)."""
    prev = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def _log_once(backend: str, reason: str) -> None:
    if (backend, reason) not in _logged:
        _logged.add((backend, reason))
        log.info("attention backend: %s (%s)", backend, reason)


def resolve_backend(q: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    requested: Optional[str] = None) -> tuple[str, str]:
    """Return (backend, reason) for these inputs; raise if an explicit request cannot run."""
    name = requested or _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attn":
        why_not = _flash_attn_reason(q, attn_mask)
        if why_not is not None:
            raise RuntimeError(
                f"attention backend 'flash_attn' was requested but cannot run: {why_not}. "
                "Use backend 'sdpa' (default) or 'auto', which falls back when flash-attn cannot run.")
        return "flash_attn", "requested"
    if name == "auto":
        why_not = _flash_attn_reason(q, attn_mask)
        if why_not is None:
            return "flash_attn", "auto: flash-attn can run on these inputs"
        return "sdpa", f"auto: flash-attn not used ({why_not})"
    return name, "requested" if requested else ("default" if name == "sdpa" else "set by set_backend")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Reference attention. attn_mask: bool (True = attend) or additive float, broadcast to (B, H, N, M)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale             # (B, H, N, M)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v.float()).to(q.dtype)                                   # (B, H, N, Dh)


def _flash_attention(q, k, v, dropout_p, scale):
    from flash_attn import flash_attn_func

    # flash-attn wants (B, N, H, Dh)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, backend: Optional[Backend] = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, Dh) tensors through the chosen backend.

    ``dropout_p`` is applied as given: callers pass 0 in eval mode.
    """
    name, reason = resolve_backend(q, attn_mask, backend)
    _log_once(name, reason)
    if name == "math":
        return math_attention(q, k, v, attn_mask, dropout_p, scale)
    if name == "flash_attn":
        return _flash_attention(q, k, v, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
