"""Packed variable-length attention and the flash-attn glue, on the CPU.

`varlen_attention` on every CPU backend equals math run on each segment alone. The flash_attn path
(unpad to packed sequences, cu_seqlens, pad back) is exercised through a FAKE `flash_attn` module put
in sys.modules, whose functions compute math per segment and record how they were called; the
availability check is patched so flash_attn "can run" on CPU tensors.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from vitlab.layers.attention import (
    attention,
    kernel_record,
    math_attention,
    reset_kernel_record,
    resolve_backend,
    varlen_attention,
)

attn_mod = importlib.import_module("vitlab.layers.attention")

ATOL, RTOL = 1e-5, 1e-4
CPU_BACKENDS = ("math", "sdpa", "auto", "sdpa_flash", "sdpa_math")


def _packed(lengths, H=3, Dh=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), H, Dh, generator=g)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _per_segment_math(q, k, v, cu_q, cu_k, scale=None) -> torch.Tensor:
    """(total_q, H, Dh): math attention on each segment alone (written without vitlab's padding)."""
    outs = []
    for i in range(len(cu_q) - 1):
        sq, sk, sv = (t[int(c[i]):int(c[i + 1])].transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        outs.append(math_attention(sq, sk, sv, scale=scale)[0].transpose(0, 1))       # (n_i, H, Dh)
    return torch.cat(outs)


def _grads(fn, q, k, v, seed=11):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * cot).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


# ------------------------------------------------------------ fallback ---

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths_q,lengths_k", [([3, 7, 1, 5], [3, 7, 1, 5]), ([2, 6, 4], [5, 1, 6])],
                         ids=["self", "cross"])
def test_varlen_fallback_equals_per_segment_math(backend, lengths_q, lengths_k):
    q, k, v = _packed(lengths_q, seed=0), _packed(lengths_k, seed=1), _packed(lengths_k, seed=2)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)

    def ours(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), scale=0.4, backend=backend)

    def reference(q, k, v):
        return _per_segment_math(q, k, v, cu_q, cu_k, scale=0.4)

    got, ref = _grads(ours, q, k, v), _grads(reference, q, k, v)
    assert got[0].shape == q.shape
    for name, o, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"{backend} {name}: {m}")


def test_varlen_fallback_accepts_a_generous_max_seqlen_and_checks_its_inputs():
    lengths = [4, 2]
    q = _packed(lengths)
    cu = _cu(lengths)
    ref = _per_segment_math(q, q, q, cu, cu)
    torch.testing.assert_close(varlen_attention(q, q, q, cu, cu, 9, 9, backend="sdpa"), ref, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match=r"max_seqlen_q=3 is smaller than the longest segment \(4\)"):
        varlen_attention(q, q, q, cu, cu, 3, 4, backend="sdpa")
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 5"):
        varlen_attention(q, q, q, cu, torch.tensor([0, 4, 5], dtype=torch.int32), 4, 4, backend="math")
    with pytest.raises(ValueError, match="pair up"):
        varlen_attention(q, q, q, cu, cu[:2], 4, 4, backend="math")


def test_varlen_fallback_records_the_kernel_that_ran():
    lengths = [4, 2]
    q, cu = _packed(lengths), _cu(lengths)
    reset_kernel_record()
    varlen_attention(q, q, q, cu, cu, 4, 4, backend="sdpa_math")
    varlen_attention(q, q, q, cu, cu, 4, 4, backend="math")
    assert kernel_record() == {"sdpa_math:math": 1, "math:math": 1}


# -------------------------------------------------- a fake flash-attn ---

class FakeFlashAttn:
    """Stands in for the flash-attn package: same call signatures, math per segment, calls recorded."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.module = types.ModuleType("flash_attn")
        self.module.flash_attn_func = self.flash_attn_func
        self.module.flash_attn_varlen_func = self.flash_attn_varlen_func
        self.module.__version__ = "0.0-fake"

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        """q (B, N, H, Dh), k, v (B, M, H, Dh) -> (B, N, H, Dh), as flash-attn lays them out."""
        self.calls.append(("dense", {"q_shape": tuple(q.shape), "k_shape": tuple(k.shape)}))
        assert q.stride(-1) == 1 and dropout_p == 0.0 and not causal
        out = math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return out.transpose(1, 2)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False):
        """q (total_q, H, Dh), k, v (total_k, H, Dh) -> (total_q, H, Dh)."""
        self.calls.append(("varlen", {"cu_seqlens_q": cu_seqlens_q.clone(), "cu_seqlens_k": cu_seqlens_k.clone(),
                                      "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k,
                                      "q_shape": tuple(q.shape), "k_shape": tuple(k.shape)}))
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu[0] == 0
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        assert int(cu_seqlens_q.diff().max()) <= max_seqlen_q and int(cu_seqlens_k.diff().max()) <= max_seqlen_k
        assert q.shape[0] == int(cu_seqlens_q[-1]) and k.shape[0] == int(cu_seqlens_k[-1])
        return _per_segment_math(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale)


@pytest.fixture
def fake_flash(monkeypatch) -> FakeFlashAttn:
    fake = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake.module)
    monkeypatch.setattr(attn_mod, "flash_attn_available", lambda: (True, "fake flash-attn"))
    # The real check refuses CPU and fp32 tensors; keep only its mask rule.
    monkeypatch.setattr(attn_mod, "_flash_attn_reason",
                        lambda q, attn_mask: None if attn_mask is None else "an attention mask was given")
    return fake


def _qkv(B, H, N, M, Dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, Dh, generator=g), torch.randn(B, H, M, Dh, generator=g),
            torch.randn(B, H, M, Dh, generator=g))


def test_flash_attn_dense_glue(fake_flash):
    q, k, v = _qkv(2, 3, 9, 9, 8)
    reset_kernel_record()
    got = _grads(lambda q, k, v: attention(q, k, v, scale=0.3, backend="flash_attn"), q, k, v)
    ref = _grads(lambda q, k, v: math_attention(q, k, v, scale=0.3), q, k, v)
    for o, r in zip(got, ref):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL)
    assert [c[0] for c in fake_flash.calls] == ["dense"]
    assert fake_flash.calls[0][1]["q_shape"] == (2, 9, 3, 8)                 # (B, N, H, Dh) for flash-attn
    assert kernel_record() == {"flash_attn:dense": 1}


def test_flash_attn_key_padding_unpads_calls_varlen_and_pads_back(fake_flash):
    lengths, H, Dh = [5, 12, 9], 2, 8
    M = max(lengths)
    q, k, v = _qkv(len(lengths), H, M, M, Dh)
    valid = torch.arange(M)[None] < torch.tensor(lengths)[:, None]          # (B, M)
    reset_kernel_record()
    q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q_, k_, v_, key_padding_mask=valid, backend="flash_attn")
    assert out.shape == q.shape
    # flash_attn_varlen_func got the real tokens only, with int32 running totals and the longest length.
    (kind, call), = fake_flash.calls
    assert kind == "varlen" and kernel_record() == {"flash_attn:varlen": 1}
    assert call["cu_seqlens_q"].tolist() == [0, 5, 17, 26] and call["cu_seqlens_k"].tolist() == [0, 5, 17, 26]
    assert call["max_seqlen_q"] == call["max_seqlen_k"] == 12
    assert call["q_shape"] == (26, H, Dh) and call["k_shape"] == (26, H, Dh)
    # Real rows: each sample alone; padded query rows: zeros.
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * cot).sum().backward()
    for b, n in enumerate(lengths):
        sq, sk, sv = (t[b:b + 1, :, :n].clone().requires_grad_(True) for t in (q, k, v))
        alone = math_attention(sq, sk, sv)
        (alone * cot[b:b + 1, :, :n]).sum().backward()
        torch.testing.assert_close(out[b:b + 1, :, :n], alone, atol=ATOL, rtol=RTOL)
        assert torch.all(out[b, :, n:] == 0)
        for got, ref in ((q_.grad, sq.grad), (k_.grad, sk.grad), (v_.grad, sv.grad)):
            torch.testing.assert_close(got[b:b + 1, :, :n], ref, atol=ATOL, rtol=RTOL)
            assert torch.all(got[b, :, n:] == 0)


def test_flash_attn_key_padding_cross_attention_keeps_every_query(fake_flash):
    B, H, N, M, Dh = 2, 2, 4, 7, 8
    q, k, v = _qkv(B, H, N, M, Dh)
    valid = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    out = attention(q, k, v, key_padding_mask=valid, backend="flash_attn")
    (_, call), = fake_flash.calls
    assert call["cu_seqlens_q"].tolist() == [0, 4, 8] and call["max_seqlen_q"] == N
    assert call["cu_seqlens_k"].tolist() == [0, 3, 10] and call["max_seqlen_k"] == 7
    ref = math_attention(q, k, v, attn_mask=valid[:, None, None])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_auto_uses_flash_attn_with_key_padding_but_not_with_a_general_mask(fake_flash):
    q, k, v = _qkv(2, 2, 6, 6, 8)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    assert resolve_backend(q, None, "auto")[0] == "flash_attn"
    reset_kernel_record()
    attention(q, k, v, key_padding_mask=valid, backend="auto")
    attention(q, k, v, backend="auto")
    assert kernel_record() == {"flash_attn:varlen": 1, "flash_attn:dense": 1}
    name, reason = resolve_backend(q, torch.ones(6, 6, dtype=torch.bool), "auto")
    assert name == "sdpa" and "mask" in reason
    with pytest.raises(RuntimeError, match="flash_attn.*mask"):
        attention(q, k, v, attn_mask=torch.ones(6, 6, dtype=torch.bool), backend="flash_attn")


def test_varlen_attention_calls_flash_attn_varlen_directly(fake_flash):
    lengths_q, lengths_k = [2, 6, 4], [5, 1, 6]
    q, k, v = _packed(lengths_q, seed=0), _packed(lengths_k, seed=1), _packed(lengths_k, seed=2)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    reset_kernel_record()
    out = varlen_attention(q, k, v, cu_q, cu_k, 6, 6, scale=0.5, backend="auto")
    (kind, call), = fake_flash.calls
    assert kind == "varlen" and torch.equal(call["cu_seqlens_q"], cu_q) and torch.equal(call["cu_seqlens_k"], cu_k)
    assert kernel_record() == {"flash_attn:varlen": 1}
    torch.testing.assert_close(out, _per_segment_math(q, k, v, cu_q, cu_k, scale=0.5), atol=ATOL, rtol=RTOL)


def test_vit_with_uneven_kept_tokens_through_flash_attn_glue(fake_flash):
    """The ViT's padded MAE batch through the flash_attn glue equals the sdpa path (real tokens)."""
    from vitlab.backbones import VisionTransformer
    from vitlab.layers import use_backend

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, rope=True,
                          num_registers=1).eval()
    x = torch.randn(3, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    mask = torch.stack([torch.randperm(16, generator=g) < n for n in (10, 4, 7)])      # 6, 12, 9 kept
    with use_backend("sdpa"):
        ref = m(x, mask=mask)
    reset_kernel_record()
    with use_backend("flash_attn"):
        out = m(x, mask=mask)
    assert kernel_record() == {"flash_attn:varlen": 2}                     # one call per block
    assert [c[1]["cu_seqlens_k"].tolist() for c in fake_flash.calls] == [[0, 8, 22, 33]] * 2   # + 2 prefix tokens
    for key in ("patch", "cls", "registers", "pooled"):
        torch.testing.assert_close(out[key], ref[key], atol=ATOL, rtol=RTOL, msg=key)
