"""Attention kernels on a CUDA device, at ViT sequence lengths (65, 197, 257, 577, 1025 tokens: /16
at 128..512 px) and head dim 64, in bfloat16 and float16: every torch SDPA kernel and flash-attn,
forward and backward, against the math reference computed in float32 from the same inputs; packed
and padded sequences through flash-attn; the kernel record and the profiler agree on what ran.

Kernels the device cannot run (torch says why) and a missing flash-attn package skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

from vitlab.layers.attention import (
    attention,
    backend_unavailable_reason,
    kernel_record,
    math_attention,
    reset_kernel_record,
    varlen_attention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SEQ_LENS = (65, 197, 257, 577, 1025)
HEAD_DIM = 64
B, H = 2, 4
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Half-precision kernels against fp32 math on the same inputs: bf16 keeps 8 mantissa bits (~4e-3 relative),
# fp16 11; outputs are O(1), gradients are compared relative to their largest entry.
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
KERNEL_OF = {"sdpa_flash": "flash", "sdpa_efficient": "efficient", "sdpa_cudnn": "cudnn", "flash_attn": "dense"}


def _qkv(n, dtype, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, HEAD_DIM, generator=g)
    k = torch.randn(B, H, m or n, HEAD_DIM, generator=g)
    v = torch.randn(B, H, m or n, HEAD_DIM, generator=g)
    return tuple(t.to("cuda", dtype) for t in (q, k, v))


def _fwd_bwd(fn, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.device, out.dtype)
    (out * cot).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _fp32_reference(q, k, v, **kw):
    return _fwd_bwd(math_attention, q.float(), k.float(), v.float(), **kw)


def _assert_close_to_reference(got, ref, dtype, label):
    tol = TOL[dtype]
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert o.dtype == dtype and o.shape == r.shape, f"{label} {name}"
        atol = tol * max(1.0, r.abs().max().item()) if name != "out" else tol
        torch.testing.assert_close(o.float(), r, atol=atol, rtol=tol, msg=lambda m, name=name: f"{label} {name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n", SEQ_LENS)
def test_kernel_matches_fp32_math(backend, dtype, n):
    q, k, v = _qkv(n, dtype)
    why = backend_unavailable_reason(backend, q, k, v)
    if why is not None:
        pytest.skip(f"{backend} cannot run here: {why}")
    ref = _fp32_reference(q, k, v)
    reset_kernel_record()
    got = _fwd_bwd(attention, q, k, v, backend=backend)
    _assert_close_to_reference(got, ref, dtype, f"{backend} N={n}")
    record = kernel_record()
    if backend == "sdpa":                 # torch's pick: a fused kernel for half precision, head dim 64
        (key,) = record
        assert key.split(":")[1] in ("flash", "efficient", "cudnn"), record
    else:
        assert record == {f"{backend}:{KERNEL_OF[backend]}": 1}


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_efficient", "sdpa_cudnn", "flash_attn", "auto"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_key_padding_matches_each_sample_alone(backend, dtype):
    """A padded batch (lengths 197, 65, 150) equals each sample alone, forward and backward."""
    lengths = [197, 65, 150]
    n = max(lengths)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(lengths), H, n, HEAD_DIM, generator=g).to("cuda", dtype) for _ in range(3))
    valid = torch.arange(n, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]
    mask = None if backend == "flash_attn" else valid[:, None, None]      # what the sdpa kernels will be given
    why = backend_unavailable_reason(backend, q, k, v, attn_mask=mask)
    if why is not None:
        pytest.skip(f"{backend} cannot run with a key padding mask here: {why}")
    q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q_, k_, v_, key_padding_mask=valid, backend=backend)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
    cot = cot * valid[:, None, :, None]
    (out * cot).sum().backward()
    for b, m in enumerate(lengths):                # each sample alone, in fp32, with the same cotangent
        sq, sk, sv = (t[b:b + 1, :, :m].float().requires_grad_(True) for t in (q, k, v))
        ref_out = math_attention(sq, sk, sv)
        (ref_out * cot[b:b + 1, :, :m].float()).sum().backward()
        got = (out[b:b + 1, :, :m], q_.grad[b:b + 1, :, :m], k_.grad[b:b + 1, :, :m], v_.grad[b:b + 1, :, :m])
        _assert_close_to_reference(got, (ref_out.detach(), sq.grad, sk.grad, sv.grad), dtype, f"{backend} sample {b}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_flash_attn_varlen_matches_per_sample_math(dtype):
    lengths = [65, 197, 1, 257]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lengths), H, HEAD_DIM, generator=g).to("cuda", dtype) for _ in range(3))
    why = backend_unavailable_reason("flash_attn", q, k, v)
    if why is not None:
        pytest.skip(f"flash_attn cannot run here: {why}")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    reset_kernel_record()
    out = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), backend="flash_attn")
    assert kernel_record() == {"flash_attn:varlen": 1}
    for i, n in enumerate(lengths):
        s = slice(int(cu[i]), int(cu[i + 1]))
        ref = math_attention(*(t[s].transpose(0, 1)[None].float() for t in (q, k, v)))[0].transpose(0, 1)
        torch.testing.assert_close(out[s].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    # The fallback (sdpa on the padded batch) agrees too.
    torch.testing.assert_close(varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), backend="sdpa").float(),
                               out.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend,op", [("sdpa_flash", "aten::_scaled_dot_product_flash_attention"),
                                        ("sdpa_efficient", "aten::_scaled_dot_product_efficient_attention"),
                                        ("sdpa_cudnn", "aten::_scaled_dot_product_cudnn_attention")])
def test_profiler_sees_the_kernel_that_was_asked_for(backend, op):
    from vitlab.cli.bench.attention import attention_ops_ran

    q, k, v = _qkv(197, torch.bfloat16)
    why = backend_unavailable_reason(backend, q, k, v)
    if why is not None:
        pytest.skip(f"{backend} cannot run here: {why}")
    ops = attention_ops_ran(lambda: _fwd_bwd(attention, q, k, v, backend=backend))
    assert op in ops, ops


def test_explicit_flash_with_a_float_mask_says_torch_s_reason():
    """torch's flash kernel takes no attention mask: sdpa_flash refuses with torch's reason and the fix."""
    q, k, v = _qkv(65, torch.bfloat16)
    mask = torch.zeros(65, 65, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError) as exc:
        attention(q, k, v, attn_mask=mask, backend="sdpa_flash")
    msg = str(exc.value)
    assert "'sdpa_flash'" in msg and "attention_backend=sdpa or auto" in msg
    assert "mask" in msg.lower()
    # sdpa picks a kernel that can, and says which.
    reset_kernel_record()
    attention(q, k, v, attn_mask=mask, backend="sdpa")
    assert next(iter(kernel_record())) in ("sdpa:efficient", "sdpa:cudnn", "sdpa:math")
