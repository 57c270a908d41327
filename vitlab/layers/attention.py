"""The one place vitlab decides which attention kernel runs.

Every transformer block calls :func:`attention` (or :func:`varlen_attention` for packed
variable-length sequences). The backend is chosen here and can be overridden globally
(:func:`set_backend`: the entry points call it with the config's ``attention_backend``, once, before building
the model), for a block of code (:func:`use_backend`) or per call (``backend=``). Nothing is read from the
environment at import time: a process that never calls :func:`set_backend` runs ``sdpa``.

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``; torch picks the
  kernel (flash / cuDNN / memory-efficient / math on GPU; flash or math on CPU).
- ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` / ``sdpa_math``: the same function inside
  ``torch.nn.attention.sdpa_kernel([SDPBackend.X])``, i.e. exactly that kernel. Where it cannot run
  on the inputs an error says why (torch's own reasons) and to use ``sdpa`` or ``auto`` instead.
  On CPU torch has only the flash kernel (no dropout) and math: ``sdpa_efficient`` and
  ``sdpa_cudnn`` need CUDA tensors.
- ``math``: the plain reference, softmax(q k^T * scale + mask) v, with fp32 softmax. Every other
  backend is tested against it.
- ``flash_attn``: the flash-attn package (Dao et al.). fp16/bf16 CUDA tensors, head dim <= 256, no
  general ``attn_mask``; a ``key_padding_mask`` is handled by unpadding to packed sequences and
  ``flash_attn_varlen_func``. Asked for where it cannot run, it raises an error that says why.
- ``auto``: ``flash_attn`` where it can run, else ``sdpa``.

Tensors are laid out (B, H, N, Dh) on every backend; packed ones (total, H, Dh).

Which kernel actually ran is recorded: every call adds one to ``"<backend>:<kernel>"`` in a
process-wide count (:func:`kernel_record`; the kernel of ``sdpa`` is the one torch's dispatcher
picks, from ``torch._fused_sdp_choice``), and the first call of each (backend, kernel, reason) is
logged at INFO, e.g. ``attention backend: sdpa -> kernel flash (default)``.

torch.compile: while dynamo traces (``torch.compiler.is_compiling()``), the kernel probe, the
record and the log are skipped, so a compiled model has no graph breaks here; compiled calls do
not appear in :func:`kernel_record` (use the profiler, e.g. ``vitlab.cli.bench.attention.
attention_ops_ran``, to see the kernels of a compiled model).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import re
import warnings
from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "math", "flash_attn"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The explicit SDPA backends: vitlab name -> (kernel name in the record, torch SDPBackend member).
SDPA_KERNELS: dict[str, tuple[str, str]] = {
    "sdpa_flash": ("flash", "FLASH_ATTENTION"),
    "sdpa_efficient": ("efficient", "EFFICIENT_ATTENTION"),
    "sdpa_cudnn": ("cudnn", "CUDNN_ATTENTION"),
    "sdpa_math": ("math", "MATH"),
}
_FIX = ("use attention_backend=sdpa or auto (backend='sdpa' / 'auto' in code), which pick a kernel that can run "
        "on these inputs")

_backend: str = "sdpa"
_source: str = "default"
_logged: set[tuple] = set()
_record: collections.Counter = collections.Counter()


def _is_compiling() -> bool:
    """True while dynamo traces (torch >= 2.3 has torch.compiler.is_compiling)."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


# --------------------------------------------------------------- the switch ---

def set_backend(name: Backend, source: str = "set by set_backend") -> None:
    """Choose the attention backend for the whole process; ``source`` is how the log names who chose it."""
    global _backend, _source
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend, _source = name, source


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Temporarily run every attention call with ``name`` (tests, benchmarks)."""
    global _backend, _source
    prev = (_backend, _source)
    set_backend(name)
    try:
        yield
    finally:
        _backend, _source = prev


@torch.compiler.assume_constant_result
def flash_attn_available() -> tuple[bool, str]:
    """Whether the flash-attn package can be used at all here, and why not.

    Cached: ``auto`` asks on every call, and a failed import searches sys.path each time. A constant to
    torch.compile, which calls it once while tracing rather than tracing the import.
    """
    return _probe_flash_attn()


@functools.cache
def _probe_flash_attn() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False, "the flash-attn package is not installed (pip install flash-attn)"
    return True, "flash-attn installed and CUDA present"


def _flash_attn_reason(q: torch.Tensor, attn_mask: torch.Tensor | None) -> str | None:
    """None if flash_attn can run on these inputs, else the reason it cannot."""
    ok, why = flash_attn_available()
    if not ok:
        return why
    if not q.is_cuda:
        return "inputs are on the CPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"inputs are {q.dtype}; flash-attn needs float16 or bfloat16"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256, the largest flash-attn supports"
    if attn_mask is not None:
        return "an attention mask was given; flash-attn takes only key padding (key_padding_mask)"
    return None


def resolve_backend(q: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    requested: str | None = None) -> tuple[str, str]:
    """Return (backend, reason) for these inputs; raise if an explicit flash_attn request cannot run.

    ``auto`` becomes ``flash_attn`` or ``sdpa``; a ``key_padding_mask`` does not count as ``attn_mask``.
    """
    name = requested or _backend
    if name not in BACKENDS:
        where = "" if requested else f" ({_source})"
        raise ValueError(f"unknown attention backend {name!r}{where}; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attn":
        why_not = _flash_attn_reason(q, attn_mask)
        if why_not is not None:
            raise RuntimeError(f"attention backend 'flash_attn' was requested but cannot run: {why_not}. "
                               f"Instead {_FIX}; auto falls back to sdpa when flash-attn cannot run.")
        return "flash_attn", "requested" if requested else _source
    if name == "auto":
        why_not = _flash_attn_reason(q, attn_mask)
        if why_not is None:
            return "flash_attn", "auto: flash-attn can run on these inputs"
        return "sdpa", f"auto: flash-attn not used ({why_not})"
    return name, "requested" if requested else _source


# ---------------------------------------------------- which kernel ran ---

@functools.cache
def _sdp_kernel_names() -> dict[int, str]:
    """torch's SDPBackend integer -> our kernel name ({0: 'math', 1: 'flash', ...} on torch 2.3..2.15)."""
    from torch.nn.attention import SDPBackend

    ours = {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
            "CUDNN_ATTENTION": "cudnn", "OVERRIDEABLE": "overrideable"}
    return {int(member.value): ours[name] for name, member in SDPBackend.__members__.items() if name in ours}


def sdpa_kernel_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       dropout_p: float = 0.0) -> str:
    """The kernel ``F.scaled_dot_product_attention`` picks for these inputs under the current sdpa_kernel
    settings: "flash" | "efficient" | "cudnn" | "math" | "overrideable", or "unknown" when this torch cannot say.

    Asks ``torch._fused_sdp_choice`` (a private op: its first five arguments have been
    (query, key, value, attn_mask, dropout_p) since torch 2.0; any failure reads "unknown").
    """
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    try:
        index = int(choose(q, k, v, attn_mask, dropout_p))
    except (RuntimeError, TypeError):      # no kernel can run, or a signature this code does not know
        return "unknown"
    return _sdp_kernel_names().get(index, "unknown")


# How torch's "<kernel> not used because:" warnings name each kernel.
_WARNING_NAMES = {"flash": "flash", "efficient": "memory efficient", "cudnn": "cudnn", "math": "math"}


def _torch_reasons(caught: list, kernel: str) -> list[str]:
    """The reasons in torch's "<kernel> not used because:" warnings for ``kernel``, as sentences.

    Where no kernel can run, torch warns a header per kernel followed by the failed check; on CUDA it
    covers the kernels sdpa_kernel switched off too, so only the asked-for kernel's section is kept.
    """
    sections: list[tuple[str, list[str]]] = []
    for w in caught:
        text = re.sub(r"\s*\(Triggered internally at .*?\)\s*$", "", str(w.message), flags=re.DOTALL).strip()
        if text.endswith("not used because:"):
            sections.append((text, []))
        elif text:
            if not sections:
                sections.append(("", []))
            sections[-1][1].append(text.rstrip("."))
    mine = [(h, r) for h, r in sections if _WARNING_NAMES[kernel] in h.lower()] or sections
    return [f"{h} {'; '.join(r)}".strip() for h, r in mine if r]


def backend_unavailable_reason(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> str | None:
    """None if ``backend`` can run on these inputs, else why not (tests and benchmarks skip with it).

    For ``sdpa_X`` this asks torch's dispatcher, with only kernel X enabled, for its choice, which
    raises where X cannot run and warns the reasons; nothing is computed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "flash_attn":
        return _flash_attn_reason(q, attn_mask)
    if backend not in SDPA_KERNELS:
        return None
    kernel, member = SDPA_KERNELS[backend]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not hasattr(SDPBackend, member):
        return f"this torch ({torch.__version__}) has no {member} kernel"
    choose = getattr(torch, "_fused_sdp_choice", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([getattr(SDPBackend, member)]):
                if choose is not None:
                    choose(q, k, v, attn_mask, dropout_p)
                else:                                           # no probe on this torch: run it
                    F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
            return None
        except RuntimeError as e:
            error = str(e).strip()
    reasons = _torch_reasons(caught, kernel)
    if not q.is_cuda and kernel in ("efficient", "cudnn"):
        reasons.insert(0, f"torch has no {kernel} kernel for {q.device.type} tensors (on the CPU only sdpa_flash, "
                          "without dropout, and sdpa_math run)")
    elif q.is_cuda:
        can_use = getattr(torch.backends.cuda, f"can_use_{kernel}_attention", None)   # none for math
        with contextlib.suppress(Exception):                   # SDPAParams' arguments differ across versions
            params = torch.backends.cuda.SDPAParams(q, k, v, attn_mask, dropout_p, False, False)
            if can_use is not None and not can_use(params):
                reasons.append(f"torch.backends.cuda.{can_use.__name__} says no")
    return "; ".join(reasons) if reasons else f"torch: {error}"


def _note(backend: str, kernel: str, reason: str) -> None:
    """Count this call in the record and log the first of each (backend, kernel, reason)."""
    _record[f"{backend}:{kernel}"] += 1
    if (backend, kernel, reason) not in _logged:
        _logged.add((backend, kernel, reason))
        log.info("attention backend: %s -> kernel %s (%s)", backend, kernel, reason)


def kernel_record() -> dict[str, int]:
    """Calls per "<backend>:<kernel>" since the start (or :func:`reset_kernel_record`), e.g.
    {"sdpa:flash": 24, "flash_attn:varlen": 12}. Calls traced by torch.compile are not counted."""
    return dict(_record)


def reset_kernel_record() -> None:
    _record.clear()


# --------------------------------------------------------------- the math ---

def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   scale: float | None = None) -> torch.Tensor:
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


def _merge_key_padding(attn_mask: torch.Tensor | None,
                       key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Fold a (B, M) key padding mask (True = real token) into attn_mask as a (B, 1, 1, M) bool mask."""
    if key_padding_mask is None:
        return attn_mask
    keep = key_padding_mask.bool()[:, None, None, :]                        # (B, 1, 1, M)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask, torch.tensor(float("-inf"), dtype=attn_mask.dtype, device=attn_mask.device))


# ------------------------------------------------------------ flash-attn ---

def _flash_attn_dense(q, k, v, dropout_p, scale):
    from flash_attn import flash_attn_func

    # flash-attn wants (B, N, H, Dh)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale)
    return out.transpose(1, 2)


def _unpad_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """valid (B, N) bool -> (flat indices of the real tokens (total,), cu_seqlens (B + 1,) int32, max_seqlen)."""
    lens = valid.sum(1, dtype=torch.int32)                                   # (B,)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))                    # (B + 1,)
    index = valid.flatten().nonzero().flatten()                              # (total,)
    return index, cu, int(lens.max())


def _pack(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """(B, H, N, Dh) -> (total, H, Dh): the tokens at ``index`` of the flattened (B * N), or all of them."""
    B, H, N, Dh = x.shape
    flat = x.transpose(1, 2).reshape(B * N, H, Dh)
    return flat if index is None else flat.index_select(0, index)


def _unpack(x: torch.Tensor, index: torch.Tensor | None, B: int, N: int) -> torch.Tensor:
    """(total, H, Dh) -> (B, H, N, Dh); rows not in ``index`` are zeros."""
    if index is not None:
        x = x.new_zeros(B * N, *x.shape[1:]).index_copy(0, index, x)
    return x.reshape(B, N, *x.shape[1:]).transpose(1, 2)


def _flash_attn_key_padding(q, k, v, key_padding_mask, dropout_p, scale):
    """flash-attn with padded keys: unpad to packed sequences, flash_attn_varlen_func, pad back.

    When N == M the queries are the same tokens as the keys (self-attention) and are unpadded alike:
    padded query rows come back as zeros. Otherwise every query is kept.
    """
    from flash_attn import flash_attn_varlen_func

    B, N, M = q.shape[0], q.shape[2], k.shape[2]
    k_index, cu_k, max_k = _unpad_index(key_padding_mask.bool())
    if N == M:
        q_index, cu_q, max_q = k_index, cu_k, max_k
    else:
        q_index, max_q = None, N
        cu_q = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(_pack(q, q_index), _pack(k, k_index), _pack(v, k_index), cu_q, cu_k, max_q, max_k,
                                 dropout_p=dropout_p, softmax_scale=scale)            # (total_q, H, Dh)
    return _unpack(out, q_index, B, N)


# ----------------------------------------------------------- dispatch ---

def _run(name: str, reason: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
         dropout_p: float, scale: float | None) -> torch.Tensor:
    """Run the resolved backend ``name``; record which kernel ran (skipped while torch.compile traces)."""
    tracing = _is_compiling()
    if name == "flash_attn":
        if not tracing:
            _note(name, "dense" if key_padding_mask is None else "varlen", reason)
        if key_padding_mask is not None:
            return _flash_attn_key_padding(q, k, v, key_padding_mask, dropout_p, scale)
        return _flash_attn_dense(q, k, v, dropout_p, scale)
    mask = _merge_key_padding(attn_mask, key_padding_mask)
    if name == "math":
        if not tracing:
            _note(name, "math", reason)
        return math_attention(q, k, v, mask, dropout_p, scale)
    if name == "sdpa":
        if not tracing:
            _note(name, sdpa_kernel_choice(q, k, v, mask, dropout_p), reason)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return _explicit_sdpa(name, reason, q, k, v, mask, dropout_p, scale, tracing)


def _explicit_sdpa(name, reason, q, k, v, mask, dropout_p, scale, tracing):
    """F.scaled_dot_product_attention with exactly one kernel enabled; a clear error where it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel, member = SDPA_KERNELS[name]
    if not hasattr(SDPBackend, member):
        raise RuntimeError(f"attention backend {name!r}: this torch ({torch.__version__}) has no {member} kernel. "
                           f"Fix: {_FIX}.")
    if tracing:                                                  # no probe, record or try/except under dynamo
        with sdpa_kernel([getattr(SDPBackend, member)]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    try:
        with sdpa_kernel([getattr(SDPBackend, member)]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    except RuntimeError as e:
        if "No available kernel" not in str(e) and "No viable backend" not in str(e):
            raise
        why = backend_unavailable_reason(name, q, k, v, mask, dropout_p) or str(e)
        raise RuntimeError(f"attention backend {name!r} cannot run on these inputs (device {q.device.type}, "
                           f"dtype {q.dtype}, shape {tuple(q.shape)}, {'a' if mask is not None else 'no'} mask, "
                           f"dropout {dropout_p}): {why}. Fix: {_FIX}.") from e
    _note(name, kernel, reason)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None,
              backend: Backend | None = None) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, Dh) q and (B, H, M, Dh) k, v through the chosen backend.

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, H, N, M).
    key_padding_mask: (B, M) bool, True = a real key; padded keys get no attention. Every sample needs
    at least one real key. Outputs at padded query positions are not meaningful (zeros on flash_attn,
    attention over the real keys elsewhere): mask them downstream.
    ``dropout_p`` is applied as given: callers pass 0 in eval mode.
    """
    name, reason = resolve_backend(q, attn_mask, backend)
    return _run(name, reason, q, k, v, attn_mask, key_padding_mask, dropout_p, scale)


def _pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, what: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (total, H, Dh) -> (B, H, max_seqlen, Dh) zero-padded, and the (B, max_seqlen) bool of real tokens."""
    lens = cu_seqlens.diff().long()                                          # (B,)
    longest, total = int(lens.max()) if len(lens) else 0, int(cu_seqlens[-1])
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen_{what}={max_seqlen} is smaller than the longest segment ({longest}); "
                         f"pass max_seqlen_{what} >= {longest}")
    if total != x.shape[0]:
        raise ValueError(f"cu_seqlens_{what} ends at {total} but the packed tensor has {x.shape[0]} tokens; "
                         "cu_seqlens must be the running total of the segment lengths, starting at 0")
    valid = torch.arange(max_seqlen, device=x.device) < lens.to(x.device)[:, None]       # (B, L)
    padded = x.new_zeros(len(lens), max_seqlen, *x.shape[1:]).index_put((valid,), x)      # (B, L, H, Dh)
    return padded.transpose(1, 2), valid


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     scale: float | None = None, backend: Backend | None = None) -> torch.Tensor:
    """Attention within each segment of packed sequences: q (total_q, H, Dh), k, v (total_k, H, Dh).

    Segment i is q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] against k, v[cu_seqlens_k[i]:cu_seqlens_k[i+1]]
    (int32 running totals starting at 0, as in flash-attn). flash_attn runs ``flash_attn_varlen_func``;
    every other backend pads the segments into a batch and runs it with a key padding mask.
    Returns (total_q, H, Dh).
    """
    name, reason = resolve_backend(q, None, backend)
    if name == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        if not _is_compiling():
            _note(name, "varlen", reason)
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      dropout_p=dropout_p, softmax_scale=scale)
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe {len(cu_seqlens_q) - 1} and "
                         f"{len(cu_seqlens_k) - 1} segments; they must pair up")
    qp, valid_q = _pad_packed(q, cu_seqlens_q, max_seqlen_q, "q")           # (B, H, Lq, Dh), (B, Lq)
    kp, valid_k = _pad_packed(k, cu_seqlens_k, max_seqlen_k, "k")
    vp, _ = _pad_packed(v, cu_seqlens_k, max_seqlen_k, "k")
    out = _run(name, reason, qp, kp, vp, None, valid_k, dropout_p, scale)   # (B, H, Lq, Dh)
    return out.transpose(1, 2)[valid_q]                                      # (total_q, H, Dh)
