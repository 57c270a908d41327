"""The attention kernel switch: every backend that runs on the CPU agrees with the `math` reference
(with and without masks, key padding, forward and backward), explicit kernels that cannot run say why,
the switch itself (set / use / resolve) behaves, the kernel that ran is recorded and logged once, and a
ViT through it compiles with no graph breaks. GPU tests: test_attention_gpu.py; packed sequences and
the flash-attn glue: test_attention_varlen.py."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import types

import pytest
import torch

from vitlab.layers.attention import (
    BACKENDS,
    attention,
    backend_unavailable_reason,
    flash_attn_available,
    get_backend,
    kernel_record,
    math_attention,
    reset_kernel_record,
    resolve_backend,
    sdpa_kernel_choice,
    set_backend,
    use_backend,
)

# The package re-exports the function `attention`, which shadows the submodule's name.
attn_mod = importlib.import_module("vitlab.layers.attention")

# fp32 parity: the kernels differ only in summation order.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-4
# Backends that run on CPU tensors: torch has a CPU flash kernel (no dropout) and its math kernel;
# sdpa_efficient and sdpa_cudnn need CUDA (their refusal is tested below), flash_attn in test_attention_varlen.py.
CPU_BACKENDS = ("math", "sdpa", "auto", "sdpa_flash", "sdpa_math")

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
    prev = (attn_mod._backend, attn_mod._source)
    yield
    attn_mod._backend, attn_mod._source = prev


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
    B, _, N, M, _ = shape
    q, k, v = _qkv(*shape)
    mask = _make_mask(mask_kind, B, N, M)
    ref = _forward_backward(math_attention, q, k, v, attn_mask=mask)
    got = _forward_backward(attention, q, k, v, attn_mask=mask, backend=backend)
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, got):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, atol=FP32_ATOL, rtol=FP32_RTOL,
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")


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


@pytest.mark.parametrize("backend", ["sdpa", "auto", "sdpa_flash", "sdpa_math"])
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
    assert BACKENDS == ("auto", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "math",
                        "flash_attn")
    assert set(attn_mod.SDPA_KERNELS) == {b for b in BACKENDS if b.startswith("sdpa_")}


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
    with pytest.raises(KeyError), use_backend("sdpa"):
        assert get_backend() == "sdpa"
        raise KeyError("boom")
    assert get_backend() == "math"
    with pytest.raises(ValueError), use_backend("nope"):
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


# ------------------------------------------------------------ key padding ---

def _key_padding(lengths, M, device="cpu"):
    """(B, M) bool, True = a real token: sample b has its first lengths[b] tokens."""
    return torch.arange(M, device=device)[None] < torch.tensor(lengths, device=device)[:, None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_key_padding_mask_equals_each_sample_alone(backend):
    """Self-attention over a padded batch: each sample's real rows equal attention over its real tokens
    alone, forward and backward; padded keys get no gradient (they are never attended to)."""
    lengths, H, Dh = [5, 12, 9], 3, 16
    M = max(lengths)
    q, k, v = _qkv(len(lengths), H, M, M, Dh)
    valid = _key_padding(lengths, M)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, key_padding_mask=valid, backend=backend)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    cot = cot * valid[:, None, :, None]                      # only the real query rows carry a loss
    (out * cot).sum().backward()
    for b, n in enumerate(lengths):
        sq, sk, sv = (t.detach()[b:b + 1, :, :n].clone().requires_grad_(True) for t in (q, k, v))
        alone = math_attention(sq, sk, sv)
        (alone * cot[b:b + 1, :, :n]).sum().backward()
        torch.testing.assert_close(out[b:b + 1, :, :n], alone, atol=FP32_ATOL, rtol=FP32_RTOL)
        for name, got, ref in (("dq", q.grad, sq.grad), ("dk", k.grad, sk.grad), ("dv", v.grad, sv.grad)):
            torch.testing.assert_close(got[b:b + 1, :, :n], ref, atol=FP32_ATOL, rtol=FP32_RTOL, msg=name)
        assert torch.all(k.grad[b, :, n:] == 0) and torch.all(v.grad[b, :, n:] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_key_padding_combines_with_attn_mask_and_cross_attention(backend, mask_kind):
    """N != M (cross-attention) with an attn_mask and padded keys: the same as math with one merged mask."""
    B, H, N, M, Dh = 2, 2, 7, 11, 8
    q, k, v = _qkv(B, H, N, M, Dh)
    mask = _make_mask(mask_kind, B, N, M)
    valid = _key_padding([6, 11], M)
    merged = (mask & valid[:, None, None]) if mask_kind == "bool" \
        else mask.masked_fill(~valid[:, None, None], -math.inf)
    ref = _forward_backward(math_attention, q, k, v, attn_mask=merged)
    got = _forward_backward(attention, q, k, v, attn_mask=mask, key_padding_mask=valid, backend=backend)
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(o, r, atol=FP32_ATOL, rtol=FP32_RTOL,
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")
    torch.testing.assert_close(ref[0].double(), _reference_fp64(q, k, v, merged), atol=FP32_ATOL, rtol=FP32_RTOL)


# ------------------------------------------------- explicit sdpa kernels ---

@pytest.mark.parametrize("backend", ["sdpa_efficient", "sdpa_cudnn"])
def test_explicit_kernel_without_a_cpu_implementation_raises_with_reason_and_fix(backend):
    q, k, v = _qkv(1, 2, 8, 8, 16)
    with pytest.raises(RuntimeError) as exc:
        attention(q, k, v, backend=backend)
    msg = str(exc.value)
    assert repr(backend) in msg                                          # which backend
    assert "no " + backend.split("_")[1] + " kernel for cpu tensors" in msg   # why
    assert "attention_backend=sdpa or auto" in msg                       # the fix
    assert backend_unavailable_reason(backend, q, k, v).startswith("torch has no")


def test_sdpa_flash_with_dropout_on_cpu_says_torch_s_reason():
    """torch's CPU flash kernel takes no dropout; the error carries torch's own explanation."""
    q, k, v = _qkv(1, 2, 8, 8, 16)
    with pytest.raises(RuntimeError) as exc:
        attention(q, k, v, dropout_p=0.5, backend="sdpa_flash")
    msg = str(exc.value)
    assert "'sdpa_flash'" in msg and "dropout" in msg and "attention_backend=sdpa or auto" in msg
    assert "Triggered internally" not in msg
    # sdpa itself falls back to a kernel that can (torch's math), and records it.
    reset_kernel_record()
    torch.manual_seed(0)
    attention(q, k, v, dropout_p=0.5, backend="sdpa")
    assert kernel_record() == {"sdpa:math": 1}


def test_torch_s_reasons_keep_the_asked_for_kernel_s_section():
    """On CUDA torch explains every kernel when none can run, those sdpa_kernel switched off too: the
    error keeps the requested kernel's reason (the warnings as torch 2.x words them)."""
    warned = [types.SimpleNamespace(message=m) for m in (
        "Memory efficient kernel not used because: (Triggered internally at sdp_utils.cpp:1.)",
        "Memory Efficient attention has been runtime disabled. (Triggered internally at sdp_utils.cpp:2.)",
        "Flash attention kernel not used because:",
        "Flash attention does not support non-null attn_mask.",
        "CuDNN attention kernel not used because:",
        "cuDNN attention has been runtime disabled.")]
    assert attn_mod._torch_reasons(warned, "flash") == [
        "Flash attention kernel not used because: Flash attention does not support non-null attn_mask"]
    assert attn_mod._torch_reasons(warned, "efficient") == [
        "Memory efficient kernel not used because: Memory Efficient attention has been runtime disabled"]
    assert attn_mod._torch_reasons(warned[:2], "cudnn") == [          # no section of its own: all of them
        "Memory efficient kernel not used because: Memory Efficient attention has been runtime disabled"]


def test_backend_unavailable_reason_on_cpu():
    q, k, v = _qkv(1, 2, 8, 8, 16)
    for b in ("auto", "sdpa", "math", "sdpa_flash", "sdpa_math"):
        assert backend_unavailable_reason(b, q, k, v) is None, b
    assert "dropout" in backend_unavailable_reason("sdpa_flash", q, k, v, dropout_p=0.1)
    assert backend_unavailable_reason("sdpa_math", q, k, v, dropout_p=0.1) is None
    if _flash_skip_reason() is not None:
        assert backend_unavailable_reason("flash_attn", q, k, v) == flash_attn_available()[1]
    with pytest.raises(ValueError, match="sdpa_flash"):
        backend_unavailable_reason("xformers", q, k, v)


# -------------------------------------------------- which kernel ran ---

def test_sdpa_kernel_choice_on_cpu():
    """On CPU torch picks its flash kernel (masks included), and math when there is dropout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(2, 2, 9, 9, 8)
    assert sdpa_kernel_choice(q, k, v) == "flash"
    assert sdpa_kernel_choice(q, k, v, attn_mask=_bool_mask(2, 9, 9)) == "flash"
    assert sdpa_kernel_choice(q, k, v, attn_mask=_float_mask(2, 9, 9)) == "flash"
    assert sdpa_kernel_choice(q, k, v, dropout_p=0.1) == "math"
    with sdpa_kernel([SDPBackend.MATH]):                          # the caller's own restriction is honoured
        assert sdpa_kernel_choice(q, k, v) == "math"
        reset_kernel_record()
        attention(q, k, v, backend="sdpa")
        assert kernel_record() == {"sdpa:math": 1}
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):           # nothing can run: no guess
        assert sdpa_kernel_choice(q, k, v) == "unknown"


def test_sdpa_kernel_choice_without_torch_s_probe(monkeypatch):
    q, k, v = _qkv(1, 1, 4, 4, 8)
    monkeypatch.delattr(torch, "_fused_sdp_choice", raising=False)
    assert sdpa_kernel_choice(q, k, v) == "unknown"
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: 99, raising=False)
    assert sdpa_kernel_choice(q, k, v) == "unknown"

    def old_signature(q, k, v):                                    # a probe that takes fewer arguments
        return 1
    monkeypatch.setattr(torch, "_fused_sdp_choice", old_signature, raising=False)
    assert sdpa_kernel_choice(q, k, v) == "unknown"


def test_kernel_record_counts_each_backend_and_kernel():
    q, k, v = _qkv(1, 2, 6, 6, 8)
    reset_kernel_record()
    for _ in range(3):
        attention(q, k, v, backend="sdpa")
    for _ in range(2):
        attention(q, k, v, backend="math")
    attention(q, k, v, backend="sdpa_flash")
    attention(q, k, v, backend="sdpa_math")
    attention(q, k, v, backend="auto")                             # here: sdpa (no flash-attn)
    with pytest.raises(RuntimeError):
        attention(q, k, v, backend="sdpa_efficient")               # a refusal runs nothing
    expected = {"sdpa:flash": 3 + (_flash_skip_reason() is not None), "math:math": 2, "sdpa_flash:flash": 1,
                "sdpa_math:math": 1}
    assert kernel_record() == expected
    record = kernel_record()
    record["sdpa:flash"] = 0                                        # a copy: the caller cannot corrupt it
    assert kernel_record() == expected
    reset_kernel_record()
    assert kernel_record() == {}


def test_kernel_logged_once_per_backend_kernel_and_reason(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_logged", set())
    # the process default (earlier tests may have called set_backend, which changes the reason's wording)
    monkeypatch.setattr(attn_mod, "_backend", "sdpa")
    monkeypatch.setattr(attn_mod, "_source", "default")
    q, k, v = _qkv(1, 2, 6, 6, 8)
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        for _ in range(3):
            attention(q, k, v)                                      # the default: sdpa
        assert [r.getMessage() for r in _backend_records(caplog)] == [
            "attention backend: sdpa -> kernel flash (default)"]
        for _ in range(2):
            attention(q, k, v, backend="sdpa_math")
            attention(q, k, v, backend="sdpa")
            torch.manual_seed(0)
            attention(q, k, v, dropout_p=0.2)                       # another kernel: logged once more
        assert [r.getMessage() for r in _backend_records(caplog)][1:] == [
            "attention backend: sdpa_math -> kernel math (requested)",
            "attention backend: sdpa -> kernel flash (requested)",
            "attention backend: sdpa -> kernel math (default)"]


def test_nothing_is_probed_recorded_or_logged_while_compiling(monkeypatch, caplog):
    """Under torch.compile tracing the probe, record and log are skipped (they would break the graph)."""
    monkeypatch.setattr(attn_mod, "_logged", set())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def no_probe(*a, **kw):
        raise AssertionError("probed the sdpa kernel while compiling")
    monkeypatch.setattr(attn_mod, "sdpa_kernel_choice", no_probe)
    q, k, v = _qkv(1, 2, 6, 6, 8)
    reset_kernel_record()
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        for b in ("sdpa", "sdpa_flash", "sdpa_math", "math", "auto"):
            torch.testing.assert_close(attention(q, k, v, backend=b), math_attention(q, k, v),
                                       atol=FP32_ATOL, rtol=FP32_RTOL)
    assert kernel_record() == {} and _backend_records(caplog) == []


@pytest.mark.parametrize("backend", ["sdpa", "auto", "sdpa_flash", "math"])
def test_vit_traces_with_no_graph_breaks(backend):
    """torch._dynamo.explain on a tiny ViT (RoPE, registers): one graph, zero breaks, for each backend."""
    import torch._dynamo

    from vitlab.backbones import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, rope=True,
                          num_registers=1).eval()
    torch._dynamo.reset()
    reset_kernel_record()
    with use_backend(backend):
        explanation = torch._dynamo.explain(m)(torch.randn(2, 3, 16, 16))
    torch._dynamo.reset()
    reasons = [str(r.reason)[:300] for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1
    assert kernel_record() == {}                   # traced calls are not counted


# ----------------------------------------------------- the default choice ---

def test_the_environment_is_not_read_at_import(monkeypatch):
    """The backend is configuration (attention_backend=, passed to set_backend by the entry points): importing the
    module with the old VITLAB_ATTN_BACKEND variable set changes nothing, and the configs do not read it either."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    monkeypatch.setenv("VITLAB_ATTN_BACKEND", "sdpa_math")
    spec = importlib.util.spec_from_file_location("_attention_fresh_copy", attn_mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.resolve_backend(torch.randn(1, 1, 4, 8)) == ("sdpa", "default")
    for name in ("train", "eval", "sample"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            assert compose(name).attention_backend == "sdpa", name
    fresh.set_backend("math", source="attention_backend=math")
    assert fresh.resolve_backend(torch.randn(1, 1, 4, 8)) == ("math", "attention_backend=math")


def test_bad_default_names_where_it_came_from(monkeypatch):
    monkeypatch.setattr(attn_mod, "_backend", "flash")
    monkeypatch.setattr(attn_mod, "_source", "attention_backend=flash")
    q, k, v = _qkv(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash' \(attention_backend=flash\)"):
        attention(q, k, v)
