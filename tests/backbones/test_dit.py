"""The DiT denoiser (Peebles & Xie 2023): adaLN-Zero identity at init and how gradients reach every part,
the paper's parameter counts, shapes, class conditioning, U-ViT long skips, position tables, the attention
dispatcher, activation checkpointing and the variant table. Tiny models keep it fast."""

from __future__ import annotations

import re

import pytest
import torch

from vitlab.backbones import DiT, dit
from vitlab.backbones.dit import VARIANTS, parse_variant
from vitlab.layers import kernel_record, reset_kernel_record, use_backend
from vitlab.layers.pos_embed import sincos_2d_pos_embed

D, HEADS, IMG, PATCH, C, K = 32, 2, 8, 2, 3, 5                          # K classes; label K is the null label


def tiny(**kw) -> DiT:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=IMG, patch_size=PATCH, in_chans=C, embed_dim=D, depth=2, num_heads=HEADS, num_classes=K)
    args.update(kw)
    return DiT(**args)


def randomize(m: DiT, seed: int = 1) -> DiT:
    """Non-zero weights everywhere, so every branch (gated to zero at init) affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * mod.in_features ** -0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return m


def inputs(B=4, H=IMG, W=IMG, chans=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, chans, H, W, generator=g)
    t = torch.tensor([0.0, 10.5, 250.0, 999.0])[:B]
    y = torch.tensor([0, 1, 4, K])[:B]                                    # the last one is the null label
    return x, t, y


# ------------------------------------------------------------ adaLN-Zero ---

@pytest.mark.parametrize("kw", [{}, {"long_skips": True, "depth": 4}, {"long_skips": True, "depth": 5},
                                {"qk_norm": True, "pos_embed": "learned"}],
                         ids=["plain", "skips-even", "skips-odd", "qknorm-learned"])
def test_every_block_is_identity_and_model_outputs_zeros_at_init(kw):
    m = tiny(**kw)
    x, t, y = inputs()
    h = torch.randn(4, (IMG // PATCH) ** 2, D)
    c = m.condition(t, y, 4)
    assert c.abs().sum() > 0                                             # a real conditioning vector
    for blk in m.blocks:
        skip = torch.randn_like(h) if blk.skip_linear is not None else None
        assert torch.equal(blk(h, c, skip), h)
    assert torch.equal(m(x, t, y), torch.zeros(4, C, IMG, IMG))
    # the trunk as a whole is the identity too: the final layer sees patch embedding + position table
    seen = {}
    m.final_layer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
    m(x, t, y)
    tokens, _ = m.x_embedder(x)
    assert torch.equal(seen["h"], tokens + m.pos_embed)


def test_init_follows_dit():
    m = tiny(depth=4, long_skips=True)
    for blk in m.blocks:
        assert not blk.adaLN_modulation[-1].weight.any() and not blk.adaLN_modulation[-1].bias.any()
    for lin in (m.final_layer.adaLN_modulation[-1], m.final_layer.linear):
        assert not lin.weight.any() and not lin.bias.any()
    skip = m.blocks[-1].skip_linear.weight                                # (D, 2D) = [I, 0]
    assert torch.equal(skip, torch.cat([torch.eye(D), torch.zeros(D, D)], dim=1))
    assert m.blocks[0].skip_linear is None and m.blocks[1].skip_linear is None
    # xavier-uniform linears: bound sqrt(6 / (fan_in + fan_out)), zero bias
    qkv = m.blocks[0].attn.qkv
    bound = (6 / (D + 3 * D)) ** 0.5
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.8 * bound and not qkv.bias.any()
    pw = m.x_embedder.proj.weight.flatten(1)                              # xavier on the (D, C*p*p) view
    assert pw.abs().max() <= (6 / (D + C * PATCH * PATCH)) ** 0.5
    assert 0.01 < m.y_embedder.embedding_table.weight.std() < 0.03
    assert 0.01 < m.t_embedder.mlp[0].weight.std() < 0.03
    assert not m.blocks[0].norm1.elementwise_affine and m.blocks[0].norm1.eps == 1e-6
    assert m.blocks[0].mlp.act.approximate == "tanh"


@pytest.mark.parametrize("long_skips", [False, True])
def test_training_reaches_every_parameter(long_skips):
    """adaLN-Zero opens up one stage per step: step 1 trains only the output linear (everything upstream of a
    zero matrix gets zero gradient); step 2 the final / block modulations (gate rows), the patch embedding and
    position table, the skip linears; step 3 the attention and MLP weights (their gates are now non-zero) and
    the timestep / label embedders (the modulation matrices they feed are now non-zero)."""
    m = tiny(depth=3, long_skips=long_skips, qk_norm=True, pos_embed="learned")
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, t, y = inputs()
    target = torch.randn_like(x)
    names = {n for n, _ in m.named_parameters()}
    reached: set[str] = set()
    never: list[set[str]] = []
    for _ in range(3):
        opt.zero_grad()
        loss = (m(x, t, y) - target).pow(2).mean()
        loss.backward()
        reached |= {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        never.append(names - reached)
        if len(never) == 1:
            assert m(x, t, y).abs().sum() > 0                             # one step: no longer zero
    assert reached >= {"final_layer.linear.weight", "final_layer.linear.bias"}
    late = re.compile(r"blocks\.\d\.(attn|mlp)\.|t_embedder\.|y_embedder\.")
    assert never[1] == {n for n in names if late.match(n)}                # after 2 steps: exactly these
    assert never[2] == set()                                              # after 3: every parameter


def test_no_weight_decay_and_position_tables():
    m = tiny()
    assert "pos_embed" not in dict(m.named_parameters())                  # DiT: fixed sin-cos, a buffer
    assert "pos_embed" in m.state_dict() and m.no_weight_decay() == set()
    assert torch.equal(m.pos_embed, sincos_2d_pos_embed(D, (IMG // PATCH, IMG // PATCH)))
    ml = tiny(pos_embed="learned")
    assert isinstance(ml.pos_embed, torch.nn.Parameter) and ml.no_weight_decay() == {"pos_embed"}
    assert torch.equal(ml.pos_embed.detach(), m.pos_embed)               # learned: starts from the sin-cos table
    with pytest.raises(ValueError, match="sincos"):
        tiny(pos_embed="rope")


def test_state_dict_uses_dit_reference_names():
    """The names of facebookresearch/DiT's models.py, so its released checkpoints load as they are."""
    keys = set(tiny(depth=1, learn_sigma=True).state_dict())
    block = [f"blocks.0.{n}.{w}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
             for w in ("weight", "bias")]
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
                "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias", *block}
    assert keys == expected


# ------------------------------------------------------------ the variants ---

@pytest.mark.parametrize("variant,millions", [("S/2", 33.0), ("B/2", 130.5), ("L/2", 458.1), ("XL/2", 675.1)])
def test_paper_parameter_counts(variant, millions):
    """DiT's Table 4 at 256 px: 32x32x4 latents, 1000 classes, learned sigma. DiT counts its frozen sin-cos
    table (an nn.Parameter with requires_grad=False there, a buffer here)."""
    with torch.device("meta"):
        m = dit(variant, img_size=32, in_chans=4, num_classes=1000, learn_sigma=True)
    n = sum(p.numel() for p in m.parameters()) + m.pos_embed.numel()
    assert abs(n / 1e6 - millions) / millions < 0.005


def test_variant_table_and_overrides():
    assert VARIANTS["XL"] == (1152, 28, 16) and VARIANTS["S"] == (384, 12, 6)
    assert VARIANTS["Ti"] == (192, 12, 3)                                  # ours: DeiT-Ti's shape
    assert parse_variant("XL/8") == ("XL", 8) and parse_variant("B") == ("B", None)
    assert parse_variant("Ti/4") == ("Ti", 4)
    with torch.device("meta"):
        m = dit("B/4")
        assert (m.embed_dim, m.depth, m.patch_size, len(m.blocks)) == (768, 12, 4, 12)
        assert m.blocks[0].mlp.fc1.out_features == 4 * 768
        m = dit("S/2", depth=4, embed_dim=64, num_heads=2, mlp_ratio=2.0, patch_size=4, in_chans=1, num_classes=10)
        assert (m.embed_dim, m.depth, m.patch_size, m.in_chans, m.null_class) == (64, 4, 4, 1, 10)
        assert m.blocks[0].attn.num_heads == 2 and m.blocks[0].mlp.fc1.out_features == 128
    with pytest.raises(ValueError, match="XL/2"):
        dit("H/2")


# ----------------------------------------------------------------- shapes ---

@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shapes(patch, chans, learn_sigma):
    m = randomize(tiny(patch_size=patch, in_chans=chans, img_size=16, learn_sigma=learn_sigma))
    x, t, y = inputs(chans=chans, H=16, W=16)
    out = m(x, t, y)
    assert m.out_chans == (2 if learn_sigma else 1) * chans
    assert out.shape == (4, m.out_chans, 16, 16)
    assert m.kind == "denoiser" and m.num_prefix_tokens == 0


def test_non_square_images_and_unpatchify_layout():
    m = tiny(img_size=(16, 32), patch_size=4, learn_sigma=True)
    assert m.img_size == (16, 32) and m.grid == (4, 8)
    x, t, y = inputs(H=16, W=32)
    assert randomize(m)(x, t, y).shape == (4, 2 * C, 16, 32)
    # token (i, j) channel (a, b, c) -> pixel (c, i*p + a, j*p + b): unpatchify inverts a patch flattening
    img = torch.randn(2, 2 * C, 16, 32)
    tokens = img.reshape(2, 2 * C, 4, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 32, 16 * 2 * C)
    assert torch.equal(m.unpatchify(tokens, (4, 8)), img)


def test_other_image_size_recomputes_the_sincos_table():
    small, big = tiny(img_size=8), tiny(img_size=16)                      # same seed: same weights
    randomize(small), randomize(big)
    x, t, y = inputs(H=16, W=16)
    torch.testing.assert_close(small(x, t, y), big(x, t, y))
    learned = randomize(tiny(img_size=8, pos_embed="learned"))
    assert learned(x, t, y).shape == (4, C, 16, 16)                        # the learned table is resampled


def test_input_errors():
    m = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*in_chans"):
        m(x[:, :1], t, y)
    with pytest.raises(ValueError, match="t must have shape"):
        m(x, t[:2], y)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        m(x, t, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny(img_size=9)


# ----------------------------------------------------------- conditioning ---

def test_class_label_changes_output_after_training():
    """At init, and after one step (only the output linear has moved), the label cannot change the output;
    from the second step on the final modulation depends on c = t_emb + y_emb."""
    m = tiny()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, t, y = inputs()
    target = torch.randn_like(x)
    for _ in range(2):
        opt.zero_grad()
        (m(x, t, y) - target).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        a, b = m(x, t, torch.tensor([0, 0, 0, 0])), m(x, t, torch.tensor([1, 1, 1, 1]))
        null = m(x, t, torch.full((4,), K))
        none = m(x, t, None)                                              # y=None: the null label for all
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    assert torch.equal(null, none)
    assert m.null_class == K


def test_timestep_changes_output_and_scalar_t_broadcasts():
    m = randomize(tiny())
    x, _, y = inputs()
    a = m(x, torch.full((4,), 3.0), y)
    assert not torch.allclose(a, m(x, torch.full((4,), 3.5), y))          # fractional t matters
    torch.testing.assert_close(m(x, torch.tensor(3.0), y), a)


def test_unconditional_model():
    m = tiny(num_classes=0)
    assert m.y_embedder is None and m.null_class is None
    assert not any(n.startswith("y_embedder") for n, _ in m.named_parameters())
    x, t, _ = inputs()
    assert randomize(m)(x, t).shape == (4, C, IMG, IMG)
    with pytest.raises(ValueError, match="unconditional.*y=None"):
        m(x, t, torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------- long skips ---

@pytest.mark.parametrize("depth", [4, 5])
def test_long_skip_wiring(depth):
    """Out block i fuses the output of in block depth // 2 - 1 - i (the middle block of an odd depth none)."""
    m = randomize(tiny(depth=depth, long_skips=True))
    n = depth // 2
    assert [blk.skip_linear is not None for blk in m.blocks] == [i >= depth - n for i in range(depth)]
    outs, skips = {}, {}
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
        blk.register_forward_pre_hook(lambda mod, args, i=i: skips.__setitem__(i, args[2]))
    m(*inputs())
    for j in range(n):
        assert skips[depth - n + j] is outs[n - 1 - j]
    assert all(skips[i] is None for i in range(depth - n))


# ------------------------------------------------------ kernels and memory ---

@pytest.mark.parametrize("long_skips", [False, True])
def test_math_and_sdpa_backends_agree(long_skips):
    m = randomize(tiny(depth=4, long_skips=long_skips, qk_norm=True)).eval()
    x, t, y = inputs()
    reset_kernel_record()
    with use_backend("math"):
        ref = m(x, t, y)
    assert sum(v for k, v in kernel_record().items() if k.startswith("math:")) == 4   # one call per block
    with use_backend("sdpa"):
        out = m(x, t, y)
    assert any(k.startswith("sdpa:") for k in kernel_record())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("long_skips", [False, True])
def test_grad_checkpointing_same_output_and_gradients(long_skips):
    x, t, y = inputs()
    results = []
    for ckpt in (False, True):
        m = randomize(tiny(depth=4, long_skips=long_skips, drop_path_rate=0.3)).train()
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(7)                                              # the same drop-path draws
        saved = []                                                        # tensors kept for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            out = m(x, t, y)
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, len(saved)))
    (o0, g0, n0), (o1, g1, n1) = results
    assert n1 < n0 / 2                                                    # checkpointing did store less
    assert torch.equal(o0, o1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)


def test_drop_path_linear_rule():
    m = tiny(depth=5, drop_path_rate=0.2)
    assert [round(blk.drop_path1.p, 6) for blk in m.blocks] == [0.0, 0.05, 0.1, 0.15, 0.2]
    x, t, y = inputs()
    m.eval()
    randomize(m)
    torch.testing.assert_close(m(x, t, y), m(x, t, y))                    # no drop-path at eval


def test_dit_keeps_the_backbone_contract():
    from tests.contracts import check_backbone
    from vitlab.backbones.base import kind_of

    m = dit("S/2", depth=2, embed_dim=32, num_heads=2, img_size=8, in_chans=1, num_classes=3)
    check_backbone(m, torch.randn(2, 1, 8, 8))
    assert kind_of(dit) == kind_of(DiT) == m.kind == "denoiser"
    assert m.layer_id("x_embedder.proj.weight") == 0 and m.layer_id("blocks.1.attn.qkv.weight") == 2
    assert m.layer_id("final_layer.linear.weight") == 3 and m.fsdp_units() == list(m.blocks)
