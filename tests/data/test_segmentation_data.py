"""Semantic-segmentation sources (CamVid, ADE20K, SegFolder), transforms and collate: vitlab/data/segmentation.py.

Real CamVid from the shared data folder (skipped when absent); synthetic image + mask trees under tmp_path for the
folder sources, the hand-computed transform checks and the error cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from tests.conftest import SHARED_DATA
from vitlab.data import DatasetNotFoundError
from vitlab.data.dense import DenseDataset
from vitlab.data.segmentation import (ADE20K, IGNORE_INDEX, CamVid, InvalidMaskError, SegFolder,
                                      build_segmentation_transform, generated_palette, segmentation_collate)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(image_uint8: torch.Tensor) -> torch.Tensor:
    """What the pipeline should give for a uint8 image (3, H, W): x / 255, minus the mean, over the std."""
    return (image_uint8.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def raw_sample(image: np.ndarray, mask: np.ndarray) -> dict:
    """A raw sample as the sources give it, from (H, W, 3) uint8 and (H, W) int arrays."""
    return {"image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
            "mask": tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64))), "orig_size": mask.shape}


def write_pair(image_dir: Path, mask_dir: Path, stem: str, mask: np.ndarray, seed: int = 0,
               image_ext: str = ".jpg") -> np.ndarray:
    """Write a random RGB image and its mask (mode L, or I;16 past 255); return the image (H, W, 3)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, size=(*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(image_dir / f"{stem}{image_ext}")
    Image.fromarray(mask.astype(np.uint8)).save(mask_dir / f"{stem}.png")
    return image


@pytest.fixture(scope="module")
def camvid() -> CamVid:
    root = SHARED_DATA / "camvid"
    if not (root / "trainannot").is_dir():
        pytest.skip(f"{root} (CamVid in SegNet's layout) is absent from the shared data folder")
    return CamVid(str(root))


# ---------------------------------------------------------------- CamVid (real data)

def test_camvid_counts_classes_palette_and_void(camvid):
    camvid.check()
    assert camvid.task == "segmentation" and camvid.ignore_index == 255
    assert camvid.splits == ("train", "val")                          # the shared copy has no test/
    train, val = camvid.dataset("train"), camvid.dataset("val")
    assert (len(train), len(val)) == (367, 101)
    assert camvid.num_classes == len(camvid.class_names) == 11 and camvid.class_names[0] == "Sky"
    assert len(camvid.palette) == 11 and len({tuple(c) for c in camvid.palette}) == 11
    row0 = np.array(Image.open(SHARED_DATA / "camvid" / "camvid11_palette.png").convert("RGB"))[0, :11]
    assert row0.tolist() == [list(c) for c in camvid.palette]

    sample = train[0]
    assert Path(train.path_of(0)).name == "0001TP_006690.jpg"
    raw = torch.from_numpy(np.array(Image.open(SHARED_DATA / "camvid" / "trainannot" / "0001TP_006690.png"))).long()
    assert (raw == 11).any(), "this frame has void pixels"
    mask = sample["mask"]
    assert mask.dtype == torch.int64 and tuple(mask.shape) == (360, 480) == sample["orig_size"]
    assert sample["image"].dtype == torch.uint8 and tuple(sample["image"].shape) == (3, 360, 480)
    assert torch.equal(mask, torch.where(raw == 11, torch.tensor(255), raw))   # void -> 255, classes unchanged


def test_camvid_train_sample_is_a_crop_with_valid_labels(camvid):
    torch.manual_seed(0)
    ds = DenseDataset(camvid.dataset("train"), camvid.build_transform(True, 64, color_jitter=0.4))
    for i in (0, 100):
        s = ds[i]
        assert tuple(s["image"].shape) == (3, 64, 64) and s["image"].dtype == torch.float32
        assert tuple(s["mask"].shape) == (64, 64) and s["mask"].dtype == torch.int64
        assert s["image_size"] == s["mask_size"] == (64, 64) and s["index"] == i and s["corrupt"] == 0
        labels = set(s["mask"].unique().tolist())
        assert labels <= set(range(11)) | {255}


def test_camvid_eval_resizes_the_image_only(camvid):
    ds = DenseDataset(camvid.dataset("val"), camvid.build_transform(False, 64, eval_size=180))
    s = ds[0]
    assert tuple(s["image"].shape) == (3, 180, 240)                   # 480x360 -> 240x180: shorter side 180
    assert tuple(s["mask"].shape) == (360, 480)                       # mIoU is scored at the original size
    assert s["image_size"] == (180, 240) and s["mask_size"] == (360, 480)
    batch = camvid.collate([s, ds[1]])
    assert tuple(batch["image"].shape) == (2, 3, 192, 256)            # padded up to multiples of 32
    assert tuple(batch["mask"].shape) == (2, 360, 480)
    assert batch["image_size"].tolist() == [[180, 240]] * 2 and batch["mask_size"].tolist() == [[360, 480]] * 2


# ---------------------------------------------------------------- transforms (hand-computed, synthetic)

def _stripes() -> tuple[np.ndarray, np.ndarray]:
    """A 16x16 image whose red channel counts columns, and a mask 1 on the left half, 2 on the right, with one
    marked pixel (class 3 at row 2, column 1) so a flip is visible in both."""
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(16, dtype=np.uint8)[None, :] * 10
    image[:, :, 1] = np.arange(16, dtype=np.uint8)[:, None] * 5
    mask = np.ones((16, 16), dtype=np.int64)
    mask[:, 8:] = 2
    mask[2, 1] = 3
    return image, mask


def test_flip_moves_the_mask_with_the_image():
    image, mask = _stripes()
    flip = build_segmentation_transform(True, 16, MEAN, STD, scale_range=(1.0, 1.0), hflip=1.0, size_divisor=16)
    out = flip(raw_sample(image, mask))
    expected_mask = torch.from_numpy(mask[:, ::-1].copy())
    assert out["mask"][2, 14] == 3 and out["mask"][0, 0] == 2 and out["mask"][0, 15] == 1
    assert torch.equal(out["mask"], expected_mask)
    expected_image = normalised(torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1))
    torch.testing.assert_close(out["image"], expected_image)
    assert out["image_size"] == out["mask_size"] == (16, 16)

    keep = build_segmentation_transform(True, 16, MEAN, STD, scale_range=(1.0, 1.0), hflip=0.0, size_divisor=16)
    out = keep(raw_sample(image, mask))
    assert torch.equal(out["mask"], torch.from_numpy(mask))
    torch.testing.assert_close(out["image"], normalised(torch.from_numpy(image).permute(2, 0, 1)))


def test_small_image_is_padded_with_the_mean_colour_and_ignore():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, size=(20, 30))
    tf = build_segmentation_transform(True, 32, MEAN, STD, scale_range=(1.0, 1.0), hflip=0.0)
    out = tf(raw_sample(image, mask))
    assert tuple(out["image"].shape) == (3, 32, 32) and tuple(out["mask"].shape) == (32, 32)
    pad = out["mask"] == IGNORE_INDEX
    assert int(pad.sum()) == 32 * 32 - 20 * 30                       # 424 padded pixels, none of the image lost
    # the mean colour rounded to 8 bits is ~0 after normalisation (at most half a grey level off)
    assert out["image"][:, pad].abs().max() <= 0.5 / 255 / min(STD) + 1e-6
    rows, cols = torch.nonzero(~pad, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())                      # where the 20x30 image landed
    assert torch.equal(out["mask"][top:top + 20, left:left + 30], torch.from_numpy(mask))
    torch.testing.assert_close(out["image"][:, top:top + 20, left:left + 30],
                               normalised(torch.from_numpy(image).permute(2, 0, 1)))


def test_random_resize_sets_the_shorter_side_to_base_size_times_the_factor():
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    mask = np.zeros((16, 24), dtype=np.int64)
    mask[:, 12:] = 1                                                  # right half class 1
    # base 32 x factor 1 -> 32 x 48 (h, w); a 64 crop then pads 32 rows and 16 columns
    tf = build_segmentation_transform(True, 64, MEAN, STD, base_size=32, scale_range=(1.0, 1.0), hflip=0.0)
    out = tf(raw_sample(image, mask))
    assert int((out["mask"] != IGNORE_INDEX).sum()) == 32 * 48
    assert int((out["mask"] == 1).sum()) == 32 * 24                   # nearest-neighbour: labels stay labels
    # no base_size: the factor scales the image itself (x2 -> 32 x 48 here)
    tf = build_segmentation_transform(True, 64, MEAN, STD, scale_range=(2.0, 2.0), hflip=0.0)
    assert int((tf(raw_sample(image, mask))["mask"] != IGNORE_INDEX).sum()) == 32 * 48


def test_transform_options_are_checked():
    with pytest.raises(ValueError, match="size_divisor"):
        build_segmentation_transform(True, 40, MEAN, STD)             # 40 is no multiple of 32
    with pytest.raises(ValueError, match="scale_range"):
        build_segmentation_transform(True, 64, MEAN, STD, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="color_jitter"):
        build_segmentation_transform(True, 64, MEAN, STD, color_jitter="strong")
    build_segmentation_transform(False, 40, MEAN, STD)                # eval: img_size is not a crop


def test_collate_pads_images_to_the_divisor_and_masks_with_ignore():
    a = {"image": torch.ones(3, 50, 70), "mask": torch.zeros(50, 70, dtype=torch.int64), "image_size": (50, 70),
         "mask_size": (50, 70), "index": 4, "corrupt": 0}
    b = {"image": torch.full((3, 64, 40), 2.0), "mask": torch.ones(64, 40, dtype=torch.int64),
         "image_size": (64, 40), "mask_size": (64, 40), "index": 9, "corrupt": 1}
    batch = segmentation_collate([a, b], size_divisor=32)
    assert tuple(batch["image"].shape) == (2, 3, 64, 96)              # max (64, 70) -> (64, 96)
    assert tuple(batch["mask"].shape) == (2, 64, 70)                  # masks: the largest, not rounded
    assert batch["image"][0, :, :50, :70].eq(1).all() and batch["image"][0, :, 50:].eq(0).all()
    assert batch["image"][0, :, :, 70:].eq(0).all() and batch["image"][1, :, :, 40:].eq(0).all()
    assert batch["mask"][0, :50, :70].eq(0).all() and batch["mask"][0, 50:].eq(255).all()
    assert batch["mask"][1, :, :40].eq(1).all() and batch["mask"][1, :, 40:].eq(255).all()
    assert batch["image_size"].tolist() == [[50, 70], [64, 40]] == batch["mask_size"].tolist()
    assert batch["index"].tolist() == [4, 9] and batch["corrupt"].tolist() == [0, 1]
    assert batch["mask"].dtype == torch.int64 and batch["image_size"].dtype == torch.int64


# ---------------------------------------------------------------- SegFolder / ADE20K (synthetic trees)

def test_segfolder_reads_pairs_and_maps_its_ignore_index(tmp_path):
    masks = [np.array([[0, 1], [2, 100]]), np.array([[2, 2], [1, 0]]), np.array([[0, 0], [0, 0]])]
    images = [write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", f"im{k}", m, seed=k,
                         image_ext=".png") for k, m in enumerate(masks)]
    write_pair(tmp_path / "images" / "val", tmp_path / "masks" / "val", "v0", masks[0])
    src = SegFolder(str(tmp_path), num_classes=3, ignore_index=100)
    src.check()
    assert src.splits == ("train", "val") and src.class_names == ["class_0", "class_1", "class_2"]
    assert src.ignore_index == 255 and len(src.palette) == 3
    train = src.dataset("train")
    assert len(train) == 3 and len(src.dataset("val")) == 1 and Path(train.path_of(1)).name == "im1.png"
    s = train[0]
    assert s["mask"].tolist() == [[0, 1], [2, 255]]                   # the folder's ignore 100 -> 255
    assert torch.equal(s["image"], torch.from_numpy(images[0]).permute(2, 0, 1))   # PNG: lossless
    loader = DataLoader(DenseDataset(train, src.build_transform(False, 32)), batch_size=3, collate_fn=src.collate)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (3, 3, 32, 32) and tuple(batch["mask"].shape) == (3, 2, 2)


def test_segfolder_reduce_zero_label(tmp_path):
    write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", "a", np.array([[0, 1], [3, 255]]))
    src = SegFolder(str(tmp_path), num_classes=3, reduce_zero_label=True, class_names=["x", "y", "z"])
    assert src.dataset("train")[0]["mask"].tolist() == [[255, 0], [2, 255]]   # 0 -> ignore, k -> k-1


def test_out_of_range_mask_value_is_an_error_naming_the_file(tmp_path):
    write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", "good", np.array([[0, 1], [1, 0]]))
    write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", "bad", np.array([[0, 7], [1, 0]]))
    src = SegFolder(str(tmp_path), num_classes=3)
    ds = src.dataset("train")                                         # sorted by stem: bad, good
    with pytest.raises(InvalidMaskError, match=r"bad\.png.*\[7\].*num_classes"):
        ds[0]
    with pytest.raises(InvalidMaskError, match=r"bad\.png"):          # not skipped as an unreadable image
        DenseDataset(ds)[0]
    assert ds[1]["mask"].tolist() == [[0, 1], [1, 0]]


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", "a", np.zeros((4, 4)))
    write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", "b", np.ones((4, 4)))
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(b"not a jpeg")
    s = DenseDataset(SegFolder(str(tmp_path), num_classes=2).dataset("train"))[0]
    assert s["index"] == 1 and s["corrupt"] == 1 and s["mask"].eq(1).all()


def test_colour_masks_are_refused(tmp_path):
    write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", "a", np.zeros((4, 4)))
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "masks" / "train" / "a.png")
    with pytest.raises(InvalidMaskError, match="mode-RGB.*class ids"):
        SegFolder(str(tmp_path), num_classes=2).dataset("train")[0]


def test_missing_folders_name_the_folder_and_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"images/train.*Expected layout.*masks/<split>/<name>\.png"):
        SegFolder(str(tmp_path), num_classes=2).check()
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"masks/train does not"):
        SegFolder(str(tmp_path), num_classes=2).check()
    with pytest.raises(DatasetNotFoundError, match=r"trainannot.*SegNet"):
        CamVid(str(tmp_path / "nowhere")).check()
    with pytest.raises(DatasetNotFoundError, match=r"annotations/\{training,validation\}"):
        ADE20K(str(tmp_path)).check()


def test_camvid_frame_without_mask_is_an_error_naming_it(tmp_path):
    write_pair(tmp_path / "train", tmp_path / "trainannot", "f1", np.zeros((4, 4)), image_ext=".png")
    write_pair(tmp_path / "train", tmp_path / "trainannot", "f2", np.full((4, 4), 11))
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "train" / "f3.jpg")
    src = CamVid(str(tmp_path))
    assert src.splits == ("train",)
    with pytest.raises(DatasetNotFoundError, match=r"1 image\(s\).*no mask.*f3\.jpg"):
        src.dataset("train")
    (tmp_path / "train" / "f3.jpg").unlink()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "trainannot" / "f4.png")
    with pytest.raises(DatasetNotFoundError, match=r"1 mask\(s\).*no image.*f4\.png"):
        src.dataset("train")
    (tmp_path / "trainannot" / "f4.png").unlink()
    ds = src.dataset("train")
    assert ds[1]["mask"].eq(255).all() and ds[0]["mask"].eq(0).all()  # f2: all void -> 255


def test_ade20k_reduces_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_pair(root / "images" / "training", root / "annotations" / "training", "ADE_train_1",
               np.array([[0, 1], [150, 75]]))
    write_pair(root / "images" / "validation", root / "annotations" / "validation", "ADE_val_1",
               np.array([[2, 2], [2, 2]]))
    src = ADE20K(str(tmp_path))                                       # the folder that holds ADEChallengeData2016/
    src.check()
    assert src.splits == ("train", "val") and src.num_classes == len(src.class_names) == 150
    assert src.class_names[:3] == ["wall", "building", "sky"] and src.class_names[-1] == "flag"
    assert len({tuple(c) for c in src.palette}) == 150
    assert src.dataset("train")[0]["mask"].tolist() == [[255, 0], [149, 74]]
    assert src.dataset("val")[0]["mask"].eq(1).all()


def test_generated_palette_is_distinct_and_fixed():
    p = generated_palette(255)
    assert len(set(p)) == 255 and (0, 0, 0) not in p
    assert p[:3] == [(128, 0, 0), (0, 128, 0), (128, 128, 0)]         # the VOC colour map from id 1
