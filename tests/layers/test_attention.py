"""The attention kernel switch: every backend agrees with the `math` reference,
the switch itself (set / use / resolve) behaves, and the choice is logged once."""

from __future__ import annotations

import logging
import math

import importlib

import pytest
import torch

from vitlab.layers.attention import (
    BACKENDS, attention, flash_attn_available, get_backend, math_attention, resolve_backend, set_backend, use_backend,
)

# The package re-exports the function `attention`, which shadows the submodule's name.
attn_mod = importlib.import_module("vitlab.layers.attention")

# fp32 parity: the kernels differ only in summation order.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-4
# Backends that can run on this CPU-only machine (flash_attn is tested separately).
CPU_BACKENDS = ("math", "sdpa", "auto")

# (B, H, N, M, Dh): square and odd token counts, cross-attention (N != M), a single token.
SHAPES = [
    (2, 3, 17, 17, 8),
    (1, 2, 5, 5, 16),
    (3, 4, 33, 33, 32),
    (2, 2, 7, 11, 24),
    (1, 1, 1, 1, 4),
]


@pytest.fixture(autouse=True)
def _restore_backend():
    prev = get_backend()
    yield
    set_backend(prev)


def _qkv(B, H, N, M, Dh, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, Dh, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, H, M, Dh, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, H, M, Dh, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _bool_mask(B, N, M, seed=1, device="cpu"):
    """(B, 1, N, M), True = attend; every query keeps at least one key (no all -inf rows)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, 1, N, M, generator=g) > 0.4
    m[..., 0] = True
    return m.to(device)


def _float_mask(B, N, M, seed=2, device="cpu"):
    """An additive (B, 1, N, M) bias with some strongly suppressed entries."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, 1, N, M, generator=g)
    m[torch.rand(B, 1, N, M, generator=g) > 0.7] = -1e4
    return m.to(device)


def _make_mask(kind, B, N, M, device="cpu"):
    if kind is None:
        return None
    return _bool_mask(B, N, M, device=device) if kind == "bool" else _float_mask(B, N, M, device=device)


def _forward_backward(fn, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    # A fixed random cotangent so every output element contributes to the grads.
    g = torch.Generator().manual_seed(123)
    cot = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    (out * cot).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


# --------------------------------------------------------------- reference ---

def _reference_fp64(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in float64, written independently of vitlab."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", p, v)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_math_matches_fp64_reference(shape, mask_kind):
    B, H, N, M, Dh = shape
    q, k, v = _qkv(*shape)
    mask = _make_mask(mask_kind, B, N, M)
    out = math_attention(q, k, v, attn_mask=mask)
    assert out.shape == (B, H, N, Dh) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_fp64(q, k, v, mask), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_math_custom_scale_and_broadcast_mask():
    q, k, v = _qkv(2, 2, 9, 9, 8)
    mask2d = torch.rand(9, 9, generator=torch.Generator().manual_seed(3)) > 0.5
    mask2d.fill_diagonal_(True)                                   # (N, M) broadcasts over B and H
    out = math_attention(q, k, v, attn_mask=mask2d, scale=0.3)
    ref = _reference_fp64(q, k, v, mask2d.expand(2, 1, 9, 9), scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=FP32_ATOL, rtol=FP32_RTOL)


# ----------------------------------------------------------- backend parity ---

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_math_forward_and_backward_fp32(backend, shape, mask_kind):
    B, H, N, M, Dh = shape
    q, k, v = _qkv(*shape)
    mask = _make_mask(mask_kind, B, N, M)
    ref = _forward_backward(math_attention, q, k, v, attn_mask=mask)
    got = _forward_backward(attention, q, k, v, attn_mask=mask, backend=backend)
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, got):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_math_with_scale(backend):
    q, k, v = _qkv(2, 3, 13, 13, 16)
    torch.testing.assert_close(attention(q, k, v, scale=0.05, backend=backend),
                               math_attention(q, k, v, scale=0.05), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_global_backend_is_used_when_no_backend_passed(backend):
    q, k, v = _qkv(2, 2, 10, 10, 8)
    mask = _bool_mask(2, 10, 10)
    with use_backend(backend):
        out = attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, math_attention(q, k, v, attn_mask=mask), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_backend_matches_math_bf16_cpu(backend):
    # bf16 has an 8-bit mantissa: outputs of magnitude ~1 agree to a few 1e-2.
    q, k, v = _qkv(2, 2, 17, 17, 16, dtype=torch.bfloat16)
    mask = _float_mask(2, 17, 17).to(torch.bfloat16)
    out = attention(q, k, v, attn_mask=mask, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference_fp64(q, k, v, mask).float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), math_attention(q, k, v, attn_mask=mask).float(), atol=3e-2, rtol=3e-2)


def test_dropout_is_applied_only_when_asked():
    q, k, v = _qkv(2, 2, 16, 16, 8)
    base = attention(q, k, v, backend="math")
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.0, backend="math"), base)
    torch.manual_seed(0)
    assert not torch.allclose(attention(q, k, v, dropout_p=0.5, backend="math"), base)


# ------------------------------------------------------------------ flash ---

def _flash_skip_reason() -> str | None:
    ok, why = flash_attn_available()
    return None if ok else f"flash_attn backend unavailable: {why}"


@pytest.mark.gpu
@pytest.mark.skipif(_flash_skip_reason() is not None, reason=_flash_skip_reason() or "")
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17, 64), (1, 4, 197, 197, 64), (2, 2, 7, 11, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_matches_math_on_gpu(shape, dtype, atol):
    """flash-attn vs the reference computed from the same half-precision inputs:
    bf16 within 3e-2, fp16 within 5e-3 (absolute, values of magnitude ~1), grads within 4x that."""
    q, k, v = _qkv(*shape, dtype=dtype, device="cuda")
    assert resolve_backend(q, None, "auto")[0] == "flash_attn"
    ref = _forward_backward(math_attention, q, k, v)
    got = _forward_backward(attention, q, k, v, backend="flash_attn")
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, got):
        assert o.dtype == dtype and o.shape == r.shape, name
        tol = atol if name == "out" else 4 * atol
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_sdpa_matches_math_on_gpu(dtype, atol):
    q, k, v = _qkv(2, 4, 65, 65, 64, dtype=dtype, device="cuda")
    ref = _forward_backward(math_attention, q, k, v)
    got = _forward_backward(attention, q, k, v, backend="sdpa")
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, got):
        tol = atol if name == "out" else 4 * atol
        torch.testing.assert_close(o.float(), r.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(_flash_skip_reason() is None, reason="flash-attn can run here; this checks the refusal")
def test_flash_attn_request_raises_with_reason_where_it_cannot_run():
    q, k, v = _qkv(1, 2, 8, 8, 16)
    with pytest.raises(RuntimeError) as exc:
        attention(q, k, v, backend="flash_attn")
    msg = str(exc.value)
    assert "flash_attn" in msg
    # It says why (no CUDA / package missing / CPU inputs) and what to use instead.
    assert any(w in msg for w in ("CUDA", "not installed", "CPU")), msg
    assert "sdpa" in msg
    # The same refusal when flash_attn is the process-wide choice.
    set_backend("flash_attn")
    with pytest.raises(RuntimeError, match="flash_attn"):
        attention(q, k, v)


def test_flash_attn_refusal_reasons_for_inputs(monkeypatch):
    """With flash-attn 'available', inputs it cannot take are refused, each with its own reason."""
    monkeypatch.setattr(attn_mod, "flash_attn_available", lambda: (True, "pretend"))
    q32 = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="CPU"):
        resolve_backend(q32, None, "flash_attn")
    # auto falls back to sdpa and says why.
    name, reason = resolve_backend(q32, None, "auto")
    assert name == "sdpa" and "CPU" in reason


def test_auto_falls_back_to_sdpa_here_with_reason():
    if _flash_skip_reason() is None:
        pytest.skip("flash-attn can run here")
    q = torch.randn(1, 2, 8, 16)
    name, reason = resolve_backend(q, None, "auto")
    assert name == "sdpa"
    assert "auto" in reason and ("CUDA" in reason or "not installed" in reason)
    name, reason = resolve_backend(q, torch.ones(8, 8, dtype=torch.bool), "auto")
    assert name == "sdpa"


# ----------------------------------------------------------------- switch ---

def test_backends_list():
    assert set(BACKENDS) == {"auto", "sdpa", "math", "flash_attn"}


def test_set_backend_rejects_unknown_names_listing_the_valid_ones():
    before = get_backend()
    with pytest.raises(ValueError) as exc:
        set_backend("flash")
    msg = str(exc.value)
    assert "'flash'" in msg
    for name in BACKENDS:
        assert name in msg
    assert get_backend() == before                     # a rejected name changes nothing


def test_per_call_unknown_backend_is_rejected():
    q, k, v = _qkv(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="sdpa"):
        attention(q, k, v, backend="xformers")


@pytest.mark.parametrize("name", ["math", "sdpa", "auto"])
def test_set_and_get_backend(name):
    set_backend(name)
    assert get_backend() == name


def test_use_backend_restores_previous_backend():
    set_backend("sdpa")
    with use_backend("math"):
        assert get_backend() == "math"
        with use_backend("auto"):
            assert get_backend() == "auto"
        assert get_backend() == "math"
    assert get_backend() == "sdpa"


def test_use_backend_restores_previous_backend_after_an_error():
    set_backend("math")
    with pytest.raises(KeyError):
        with use_backend("sdpa"):
            assert get_backend() == "sdpa"
            raise KeyError("boom")
    assert get_backend() == "math"
    with pytest.raises(ValueError):
        with use_backend("nope"):
            pass
    assert get_backend() == "math"


def test_resolve_reasons():
    q = torch.randn(1, 1, 4, 8)
    assert resolve_backend(q, None, "math") == ("math", "requested")
    set_backend("math")
    name, reason = resolve_backend(q)
    assert name == "math" and "set_backend" in reason
    set_backend("sdpa")
    assert resolve_backend(q)[0] == "sdpa"


# ---------------------------------------------------------------- logging ---

def _backend_records(caplog):
    return [r for r in caplog.records if r.name == attn_mod.__name__ and "attention backend" in r.getMessage()]


def test_backend_logged_once_with_reason(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_logged", set())
    q, k, v = _qkv(1, 2, 6, 6, 8)
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        for _ in range(3):
            attention(q, k, v, backend="math")
        recs = _backend_records(caplog)
        assert len(recs) == 1
        assert "math" in recs[0].getMessage() and "requested" in recs[0].getMessage()
        assert recs[0].levelno == logging.INFO

        # A different choice is logged, once, with its own reason.
        with use_backend("auto"):
            for _ in range(3):
                attention(q, k, v)
        recs = _backend_records(caplog)
        assert len(recs) == 2
        assert "auto" in recs[1].getMessage()
        if _flash_skip_reason() is not None:
            assert "sdpa" in recs[1].getMessage()

        for _ in range(2):
            attention(q, k, v, backend="math")
        assert len(_backend_records(caplog)) == 2
