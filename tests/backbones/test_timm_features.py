"""Hierarchical timm backbones (features_only) behind the backbone contract."""

from __future__ import annotations

import pytest
import timm
import torch

from vitlab.backbones import TimmFeatures, timm_backbone
from vitlab.tasks import ClassificationHead


@pytest.fixture(scope="module")
def pvt():
    torch.manual_seed(0)
    return timm_backbone("pvt_v2_b0", img_size=64)


def test_pvt_shapes_and_strides(pvt):
    assert isinstance(pvt, TimmFeatures)
    assert pvt.pyramid_strides == [4, 8, 16, 32]
    assert pvt.pyramid_channels == [32, 64, 160, 256]            # PVT-v2-b0's widths (Wang et al. 2022, Table 1)
    assert (pvt.embed_dim, pvt.patch_size, pvt.num_prefix_tokens, pvt.grid) == (256, 32, 0, (2, 2))
    for size in [(64, 64), (64, 96)]:
        out = pvt(torch.randn(2, 3, *size))
        assert [tuple(m.shape) for m in out["pyramid"]] == [
            (2, c, size[0] // s, size[1] // s) for c, s in zip(pvt.pyramid_channels, pvt.pyramid_strides)]
        assert out["patch_2d"] is out["pyramid"][-1]
        assert out["grid"] == (size[0] // 32, size[1] // 32)
        torch.testing.assert_close(out["pooled"], out["patch_2d"].mean(dim=(2, 3)))
        assert out["patch"].shape == (2, out["grid"][0] * out["grid"][1], 256)


def test_classification_head_on_pooled(pvt):
    head = ClassificationHead(pvt.embed_dim, 5)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    pvt.zero_grad()
    logits = head(pvt(x))
    assert logits.shape == (4, 5)
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = [p.grad for p in pvt.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    pvt.zero_grad()


def test_mask_refused(pvt):
    with pytest.raises(ValueError, match="needs a ViT"):
        pvt(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 4, dtype=torch.bool))


def test_out_indices_subset_and_errors():
    b = timm_backbone("pvt_v2_b0", img_size=64, out_indices=[1, 3])
    assert b.pyramid_strides == [8, 32] and b.pyramid_channels == [64, 256]
    assert len(b(torch.randn(1, 3, 64, 64))["pyramid"]) == 2
    last2 = timm_backbone("pvt_v2_b0", img_size=64, out_indices=2)          # an int n: the last n levels (timm)
    assert last2.pyramid_strides == [16, 32]
    with pytest.raises(ValueError, match="among 0..3"):
        timm_backbone("pvt_v2_b0", out_indices=[4])
    with pytest.raises(ValueError, match="no model 'not_a_model'"):
        timm_backbone("not_a_model")
    with pytest.raises(ValueError, match="out_indices"):
        timm_backbone("resnet18", out_indices=[0, 9])


def test_channels_last_models_are_permuted():
    """Swin's feature maps are NHWC in timm; the backbone hands NCHW maps to the necks (a 4-block Swin)."""
    b = timm_backbone("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                      num_heads=(1, 1, 1, 1), window_size=4)
    assert b.channels_last and b.pyramid_channels == [16, 32, 64, 128]
    out = b(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in out["pyramid"]] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]


def test_local_weights_load_non_strictly(tmp_path, caplog):
    torch.manual_seed(1)
    full = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=7)      # a full timm model, with its head
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(full.state_dict(), path)
    with caplog.at_level("INFO"):
        b = timm_backbone("pvt_v2_b0", img_size=64, weights=str(path))
    assert "loaded 176/176" in caplog.text
    assert b.load_report["missing"] == [] and b.load_report["shape_mismatch"] == []
    assert b.load_report["unexpected"] == ["head.bias", "head.weight"]           # features_only has no head
    torch.testing.assert_close(b.model.state_dict()["stages_1.blocks.0.attn.q.weight"],
                               full.state_dict()["stages.1.blocks.0.attn.q.weight"])
    x = torch.randn(1, 3, 64, 64)
    full.eval(), b.eval()
    torch.testing.assert_close(b(x)["patch_2d"], full.forward_features(x))  # the same network, the same output
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="matches none"):
        timm_backbone("pvt_v2_b0", img_size=64, weights=str(tmp_path / "other.pth"))


def test_grad_checkpointing_keeps_gradients(pvt):
    x = torch.randn(1, 3, 64, 64)
    pvt.zero_grad()
    pvt(x)["pooled"].sum().backward()
    ref = pvt.model.patch_embed.proj.weight.grad.clone()
    pvt.zero_grad()
    pvt.set_grad_checkpointing(True)
    try:
        pvt(x)["pooled"].sum().backward()
    finally:
        pvt.set_grad_checkpointing(False)
    torch.testing.assert_close(pvt.model.patch_embed.proj.weight.grad, ref)
    pvt.zero_grad()


def test_a_timm_pyramid_keeps_the_backbone_contract(pvt):
    from tests.contracts import check_backbone

    check_backbone(pvt, torch.randn(1, 3, 64, 64))
    assert pvt.kind == "encoder" and pvt.mask_mode is None and pvt.num_layers == 0      # no layer decay yet
