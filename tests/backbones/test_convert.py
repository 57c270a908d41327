"""Loading timm ViT weights: converted models give timm's logits, from a state dict, a file or a URL."""

from __future__ import annotations

import logging

import pytest
import torch

timm_vit = pytest.importorskip("timm.models.vision_transformer")

from vitlab.backbones import VisionTransformer  # noqa: E402
from vitlab.backbones.convert import convert_timm_vit, load_timm_weights  # noqa: E402
from vitlab.tasks.classification import ClassificationHead  # noqa: E402

ATOL = 1e-4                       # fp32: max |logit difference|
D, DEPTH, HEADS, IMG, PATCH, CLASSES = 64, 2, 4, 32, 8, 10


def make_timm(seed=0, **kw) -> torch.nn.Module:
    """A small timm ViT with random weights everywhere (tokens and position table included)."""
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    args.update(kw)
    m = timm_vit.VisionTransformer(**args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("cls_token", "reg_token", "pos_embed"):
                p.normal_()
            elif name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def make_ours(**kw) -> tuple[VisionTransformer, ClassificationHead]:
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    args.update(kw)
    return VisionTransformer(**args).eval(), ClassificationHead(D, CLASSES).eval()


def images(B=3, H=IMG, W=IMG, seed=1):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def convert_into(timm_model, backbone, head, **kw):
    bb_sd, head_sd = convert_timm_vit(timm_model.state_dict(), backbone, **kw)
    backbone.load_state_dict(bb_sd, strict=False)
    missing = set(backbone.state_dict()) - set(bb_sd) - {"mask_token"}
    assert not missing, missing
    head.load_state_dict(head_sd)


def assert_same_logits(timm_model, backbone, head, x):
    with torch.no_grad():
        ref = timm_model(x)
        got = head(backbone(x))
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= ATOL, f"max |logit diff| {err:.2e} > {ATOL}"
    # The check has teeth: logits vary across samples and classes.
    assert ref.std() > 0.1


# (timm kwargs, our kwargs)
CASES = {
    "cls_token": ({}, {}),
    "avg_pool": (dict(global_pool="avg"), dict(global_pool="avg")),
    "avg_pool_no_cls": (dict(global_pool="avg", class_token=False), dict(global_pool="avg", class_token=False)),
    "reg4_no_embed_class": (dict(reg_tokens=4, no_embed_class=True), dict(num_registers=4, class_pos_embed=False)),
    "reg4_embed_class_folded": (dict(reg_tokens=4, no_embed_class=False), dict(num_registers=4)),
    "reg4_gap_no_cls": (dict(reg_tokens=4, no_embed_class=True, class_token=False, global_pool="avg"),
                        dict(num_registers=4, class_token=False, global_pool="avg")),
    "no_embed_class_zero_cls_row": (dict(no_embed_class=True), dict(class_pos_embed=True)),
    "embed_class_folded_into_token": (dict(no_embed_class=False), dict(class_pos_embed=False)),
    "qk_norm_layer_scale": (dict(qk_norm=True, init_values=0.1), dict(qk_norm=True, layer_scale_init=0.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_match_timm(case):
    timm_kw, our_kw = CASES[case]
    t = make_timm(**timm_kw)
    ours, head = make_ours(**our_kw)
    convert_into(t, ours, head)
    assert_same_logits(t, ours, head, images())


def test_conversion_is_not_trivially_equal_before_loading():
    t = make_timm()
    ours, head = make_ours()
    with torch.no_grad():
        assert (t(images()) - head(ours(images()))).abs().max() > 10 * ATOL


@pytest.mark.parametrize("timm_kw,our_kw", [CASES["cls_token"], CASES["reg4_embed_class_folded"],
                                            CASES["reg4_no_embed_class"]], ids=["cls", "reg4_folded", "reg4"])
@pytest.mark.parametrize("size", [(48, 48), (48, 40)], ids=["48", "48x40"])
def test_load_into_another_image_size_matches_timm_dynamic(timm_kw, our_kw, size):
    """Our model built for 48 px from timm weights for 32 px resamples pos_embed as timm does at run time."""
    t = make_timm(dynamic_img_size=True, **timm_kw)
    ours, head = make_ours(img_size=size, **our_kw)
    convert_into(t, ours, head)
    assert ours.pos_embed.shape == (1, ours.num_pos_prefix + (size[0] // PATCH) * (size[1] // PATCH), D)
    assert_same_logits(t, ours, head, images(H=size[0], W=size[1]))
    # And a 32 px model run on 48 px input (resampled on the fly) agrees as well.
    ours32, head32 = make_ours(**our_kw)
    convert_into(t, ours32, head32)
    assert_same_logits(t, ours32, head32, images(H=size[0], W=size[1]))


def test_non_square_source_of_the_same_size_needs_no_old_grid():
    t = make_timm(img_size=(32, 40))                       # 4 x 5 patches + class token: 21 rows, unambiguous
    ours, head = make_ours(img_size=(32, 40))
    convert_into(t, ours, head)
    assert_same_logits(t, ours, head, images(H=32, W=40))


def test_ambiguous_position_table_is_refused_without_old_grid():
    """4 x 6 patches + a class row = 25 rows, which also reads as a 5 x 5 grid without one:
    refused rather than guessed; with old_grid it loads exactly."""
    t = make_timm(img_size=(32, 48))
    ours, head = make_ours(img_size=(32, 48))
    with pytest.raises(ValueError, match="old_grid"):
        convert_timm_vit(t.state_dict(), ours)
    convert_into(t, ours, head, old_grid=(4, 6))
    assert_same_logits(t, ours, head, images(H=32, W=48))
    with pytest.raises(ValueError, match=r"old_grid=\(5, 6\)"):
        convert_timm_vit(t.state_dict(), ours, old_grid=(5, 6))


def test_non_square_source_into_another_size_matches_timm_dynamic():
    t = make_timm(img_size=(32, 48), dynamic_img_size=True)
    ours, head = make_ours(img_size=48)
    convert_into(t, ours, head, old_grid=(4, 6))
    assert_same_logits(t, ours, head, images(H=48, W=48))


def test_module_prefix_is_stripped():
    t = make_timm()
    ours, head = make_ours()
    sd = {"module." + k: v for k, v in t.state_dict().items()}
    bb, hd = convert_timm_vit(sd, ours)
    ours.load_state_dict(bb, strict=False)
    head.load_state_dict(hd)
    assert_same_logits(t, ours, head, images())


def test_structure_mismatches_are_refused():
    t = make_timm(reg_tokens=4, no_embed_class=True)
    with pytest.raises(ValueError, match="4 registers"):
        convert_timm_vit(t.state_dict(), make_ours()[0])
    with pytest.raises(ValueError, match="pos_embed='none'"):
        convert_timm_vit(make_timm().state_dict(), make_ours(pos_embed="none")[0])


def test_distilled_deit_is_refused_clearly():
    sd = dict(make_timm().state_dict())
    sd["dist_token"] = torch.zeros(1, 1, D)
    sd["head_dist.weight"] = torch.zeros(CLASSES, D)
    sd["head_dist.bias"] = torch.zeros(CLASSES)
    sd["pos_embed"] = torch.zeros(1, 2 + 16, D)
    with pytest.raises(ValueError) as exc:
        convert_timm_vit(sd, make_ours()[0])
    msg = str(exc.value)
    assert "dist_token" in msg and "head_dist.weight" in msg and "Distilled" in msg


# ------------------------------------------------------------ load sources ---

def _check_loaded(t, ours, head):
    assert_same_logits(t, ours, head, images())


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_load_from_file(tmp_path, wrap):
    t = make_timm()
    sd = t.state_dict()
    path = tmp_path / "vit.pth"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    ours, head = make_ours()
    load_timm_weights(ours, str(path), head=head)
    _check_loaded(t, ours, head)


def test_load_from_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    t = make_timm(reg_tokens=4, no_embed_class=True)
    path = tmp_path / "vit.safetensors"
    st.save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(path))
    ours, head = make_ours(num_registers=4, class_pos_embed=False)
    load_timm_weights(ours, str(path), head=head)
    _check_loaded(t, ours, head)


def test_load_into_another_size_and_class_count(tmp_path, caplog):
    t = make_timm(dynamic_img_size=True)
    torch.save(t.state_dict(), tmp_path / "w.pth")
    ours = VisionTransformer(img_size=48, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS).eval()
    head = ClassificationHead(D, 7)
    fresh = {k: v.clone() for k, v in head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="vitlab.backbones.convert"):
        load_timm_weights(ours, str(tmp_path / "w.pth"), head=head)
    assert ours.pos_embed.shape == (1, 1 + 36, D)
    for k, v in head.state_dict().items():                    # a new number of classes keeps the fresh head
        assert torch.equal(v, fresh[k])
    assert any("not loaded" in r.getMessage() for r in caplog.records)
    # The backbone is timm's: its pre-logits features give timm's logits through timm's head.
    with torch.no_grad():
        x = images(H=48, W=48)
        torch.testing.assert_close(t.head(ours(x)["pooled"]), t(x), atol=ATOL, rtol=0)


def test_strict_load_reports_unexpected_keys(tmp_path):
    sd = dict(make_timm().state_dict())
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="unexpected"):
        load_timm_weights(make_ours()[0], str(tmp_path / "w.pth"))
    load_timm_weights(make_ours()[0], str(tmp_path / "w.pth"), strict=False)


def test_missing_file_is_a_helpful_error(tmp_path):
    missing = tmp_path / "nope" / "vit.pth"
    with pytest.raises(FileNotFoundError) as exc:
        load_timm_weights(make_ours()[0], str(missing))
    msg = str(exc.value)
    assert str(missing) in msg and "http" in msg and "timm:" in msg


@pytest.fixture
def http_dir(tmp_path, http_serve):
    """Serve tmp_path/'srv' on 127.0.0.1 (the shared http_serve fixture); yields (dir, base URL)."""
    root = tmp_path / "srv"
    root.mkdir()
    return root, http_serve(root)


@pytest.mark.parametrize("wrap", [None, "model"], ids=["plain", "wrapped"])
def test_load_from_http_url(http_dir, tmp_path, wrap):
    root, base = http_dir
    t = make_timm(global_pool="avg")
    sd = t.state_dict()
    torch.save(sd if wrap is None else {wrap: sd}, root / "vit_tiny_test.pth")
    cache = tmp_path / "hub"
    ours, head = make_ours(global_pool="avg")
    load_timm_weights(ours, f"{base}/vit_tiny_test.pth", head=head, cache_dir=str(cache))
    _check_loaded(t, ours, head)
    assert (cache / "vit_tiny_test.pth").is_file()             # cached by torch.hub in the given folder
    # A second load is served from the cache, even with the server's copy gone.
    (root / "vit_tiny_test.pth").unlink()
    ours2, head2 = make_ours(global_pool="avg")
    load_timm_weights(ours2, f"{base}/vit_tiny_test.pth", head=head2, cache_dir=str(cache))
    _check_loaded(t, ours2, head2)


# --------------------------------------------- the benchmark's timm reference ---

@pytest.mark.parametrize("kw", [
    {},
    {"global_pool": "avg", "class_token": False},
    {"layer_scale_init": 1e-5, "qk_norm": True, "qkv_bias": False},
    {"class_pos_embed": False, "mlp_ratio": 2.0},
    {"pos_embed": "none"},
], ids=["plain", "avgpool", "layerscale_qknorm_nobias", "no_cls_pos_mlp2", "no_pos"])
def test_timm_equivalent_is_the_same_network(kw):
    """create_timm_equivalent builds timm's ViT with the same parameter count, and with vitlab's weights
    converted into it... the other way round: timm's random weights converted into vitlab give the same logits."""
    from vitlab.backbones.convert import create_timm_equivalent
    from vitlab.tasks import ClassificationTask

    base = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    ours = VisionTransformer(**{**base, **kw})
    task = ClassificationTask(in_dim=D, num_classes=CLASSES)
    ref, differences = create_timm_equivalent(ours, CLASSES)
    assert differences == []
    n_ours = sum(p.numel() for p in ours.parameters()) + sum(p.numel() for p in task.parameters())
    assert sum(p.numel() for p in ref.parameters()) == n_ours
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    backbone_sd, head_sd = convert_timm_vit(ref.state_dict(), ours)
    ours.load_state_dict(backbone_sd, strict=False)
    task.head.load_state_dict(head_sd)
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(task(ours.eval()(x)), ref.eval()(x), atol=ATOL, rtol=1e-4)


def test_timm_equivalent_names_what_timm_cannot_express():
    from vitlab.backbones.convert import create_timm_equivalent

    ours = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, rope=True,
                             num_registers=2)
    _, differences = create_timm_equivalent(ours, CLASSES)
    assert any("RoPE" in d for d in differences) and any("registers" in d for d in differences)


def test_timm_model_name_only_for_the_same_configuration():
    from vitlab.backbones import vit
    from vitlab.backbones.convert import timm_model_name

    assert timm_model_name(vit("B/16", img_size=224), 1000) == "vit_base_patch16_224"
    assert timm_model_name(vit("S/16", img_size=224), 10) == "vit_small_patch16_224"
    assert timm_model_name(vit("Ti/16", img_size=64, in_chans=1), 10) is None          # timm registers no 64 px
    assert timm_model_name(vit("L/16", img_size=224, qk_norm=True), 1000) is None       # other parameters
    assert timm_model_name(vit("B/16", img_size=224, global_pool="avg", class_token=False), 1000) is None
