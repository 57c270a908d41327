"""Detection data: the VOC and COCO sources on the shared BCCD / tiny-coco data and on tiny synthetic trees, the
box-aware transforms (flip, eval resize + pad, large-scale jitter) and the batch collate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from vitlab.data.base import DataConfigError, DatasetNotFoundError
from vitlab.data.dense import DenseDataset
from vitlab.data.detection import COCODetection, DetectionTransform, VOCDetection, detection_collate

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def bccd_root(shared_data: Path) -> Path:
    root = shared_data / "bccd" / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"{root} (BCCD, Pascal VOC layout) is absent from the shared data folder")
    return root


@pytest.fixture(scope="module")
def bccd(bccd_root: Path) -> VOCDetection:
    return VOCDetection(str(bccd_root))


@pytest.fixture(scope="module")
def coco_root(shared_data: Path) -> Path:
    root = shared_data / "tiny-coco"
    if not (root / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"{root} (tiny-coco) is absent from the shared data folder")
    return root


@pytest.fixture(scope="module")
def tiny_coco(coco_root: Path) -> COCODetection:
    return COCODetection(str(coco_root))


def _index_of(ds, name: str) -> int:
    return next(i for i in range(len(ds)) if ds.path_of(i).endswith(name))


def _write_jpg(path: Path, h: int, w: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _write_voc(root: Path, images: dict, splits: dict) -> None:
    """images: {id: (h, w, [(name, xmin, ymin, xmax, ymax, difficult), ...])} (VOC's 1-based coordinates)."""
    for stem, (h, w, objects) in images.items():
        _write_jpg(root / "JPEGImages" / f"{stem}.jpg", h, w)
        objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                       f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for n, x1, y1, x2, y2, d in objects)
        xml = (f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height>"
               f"<depth>3</depth></size>{objs}</annotation>")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def _write_coco(root: Path, split: str, images: list, annotations: list, categories: list) -> None:
    """images: [(id, file_name, h, w)]; annotations: [(image_id, category_id, [x, y, w, h], iscrowd)]."""
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    for _, name, h, w in images:
        _write_jpg(root / f"{split}2017" / name, h, w)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd, "area": 1.0,
                             "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3]]]}
                            for k, (i, c, b, crowd) in enumerate(annotations)],
            "categories": [{"id": i, "name": n} for i, n in categories]}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def _synthetic_sample(h: int, w: int, boxes: list, block: tuple | None = None) -> dict:
    """A raw sample with a black image (a white block at ``block`` = (x1, y1, x2, y2) when given)."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    if block is not None:
        x1, y1, x2, y2 = block
        image[:, y1:y2, x1:x2] = 255
    n = len(boxes)
    return {"image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                              canvas_size=(h, w)),
            "labels": torch.arange(n, dtype=torch.int64), "iscrowd": torch.zeros(n, dtype=torch.uint8),
            "image_id": 7, "orig_size": (h, w)}


# --------------------------------------------------------------------------------------------------- real: BCCD

def test_bccd_loads_with_its_splits_classes_and_counts(bccd: VOCDetection):
    assert bccd.task == "detection" and bccd.name == "voc"
    assert bccd.splits == ("train", "val")
    assert bccd.class_names == ["Platelets", "RBC", "WBC"] and bccd.num_classes == 3
    train, val = bccd.dataset("train"), bccd.dataset("val")
    assert (len(train), len(val)) == (205, 87)
    sample = train[0]
    assert isinstance(sample["image"], tv_tensors.Image) and sample["image"].dtype == torch.uint8
    assert sample["image"].shape == (3, 480, 640) and sample["orig_size"] == (480, 640)
    assert isinstance(sample["boxes"], tv_tensors.BoundingBoxes) and sample["boxes"].canvas_size == (480, 640)
    assert sample["labels"].dtype == torch.int64 and sample["iscrowd"].dtype == torch.uint8
    assert len(sample["boxes"]) == len(sample["labels"]) == len(sample["iscrowd"]) > 0
    assert train.path_of(0).endswith("BloodImage_00001.jpg")
    with pytest.raises(DatasetNotFoundError, match="no 'test' split"):
        bccd.dataset("test")


def test_bccd_drops_the_two_degenerate_boxes(bccd_root: Path, caplog):
    source = VOCDetection(str(bccd_root), classes=["Platelets", "RBC", "WBC"])
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        val = source.dataset("val")
        source.dataset("train")
    assert source.dropped == {"train": 1, "val": 1}
    lines = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(lines) == 2                                   # one line per split
    assert any("voc val: dropped 1" in m and "BloodImage_00338.xml" in m for m in lines)
    assert any("voc train: dropped 1" in m and "BloodImage_00343.xml" in m for m in lines)
    # BloodImage_00338.xml: 14 objects, one of them (504, 337, 504, 337); its first box (453, 81, 555, 182) is
    # 1-based: xmin / ymin shift by -1
    sample = val[_index_of(val, "BloodImage_00338.jpg")]
    assert len(sample["boxes"]) == 13
    assert sample["boxes"][0].tolist() == [452.0, 80.0, 555.0, 182.0]
    widths = sample["boxes"][:, 2:] - sample["boxes"][:, :2]
    assert (widths > 0).all()
    assert sample["labels"][-1].item() == 2 and sample["labels"][0].item() == 1   # WBC last, RBC first


# ---------------------------------------------------------------------------------------------- real: tiny-coco

def test_tiny_coco_loads_with_contiguous_labels(tiny_coco: COCODetection, coco_root: Path):
    assert tiny_coco.splits == ("train", "val") and tiny_coco.task == "detection"
    assert tiny_coco.num_classes == 80
    assert tiny_coco.class_names[0] == "person" and tiny_coco.class_names[-1] == "toothbrush"
    val = tiny_coco.dataset("val")
    assert len(val) == 50 and len(tiny_coco.dataset("train")) == 50
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    ids = sorted(c["id"] for c in data["categories"])         # 1..90 with gaps -> 0..79
    img = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
    i = _index_of(val, img["file_name"])
    sample = val[i]
    assert sample["image_id"] == img["id"] and sample["orig_size"] == (img["height"], img["width"])
    assert sample["labels"].tolist() == [ids.index(a["category_id"]) for a in anns]
    x, y, w, h = anns[0]["bbox"]
    assert sample["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-3)
    assert sample["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
    # COCO's size buckets read the annotation's (mask) area, not the box's; it survives the transforms unscaled
    assert sample["area"].tolist() == pytest.approx([a["area"] for a in anns], rel=1e-5)
    out = tiny_coco.build_transform(False, 96)(sample)
    assert out["area"].tolist() == pytest.approx([a["area"] for a in anns], rel=1e-5)
    labels = torch.cat([torch.from_numpy(r.labels) for r in val.records])
    assert labels.min() >= 0 and labels.max() < 80 and tiny_coco.dropped["val"] == 0


def test_tiny_coco_image_without_annotations_survives_transform_and_collate(tiny_coco: COCODetection):
    train = tiny_coco.dataset("train")
    i = _index_of(train, "000000262284.jpg")                   # the train image with no annotations
    assert train[i]["boxes"].shape == (0, 4)
    ds = DenseDataset(train, tiny_coco.build_transform(True, 64))
    empty, other = ds[i], ds[0]
    assert empty["image"].shape == (3, 64, 64) and empty["boxes"].shape == (0, 4)
    assert empty["labels"].shape == (0,) and empty["iscrowd"].shape == (0,)
    batch = tiny_coco.collate([empty, other])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["boxes"][0].shape == (0, 4)
    assert batch["index"].tolist() == [i, 0]


def test_eval_transform_maps_back_with_scale_on_a_non_square_image(tiny_coco: COCODetection):
    val = tiny_coco.dataset("val")
    raw = val[_index_of(val, "000000397133.jpg")]              # 427 x 640
    out = tiny_coco.build_transform(False, 96)(raw)
    # longer side 640 -> 96: scale 0.15; valid height floor(427 * 0.15) = 64
    assert out["scale"] == pytest.approx(0.15)
    assert out["image_size"].tolist() == [64, 96] and out["orig_size"].tolist() == [427, 640]
    assert out["image"].shape == (3, 96, 96)
    assert torch.allclose(out["boxes"] / out["scale"], raw["boxes"].as_subclass(torch.Tensor), atol=1e-3)
    assert out["image"][:, 64:, :].abs().max() < 1e-5          # mean-colour padding normalises to 0
    assert out["labels"].tolist() == raw["labels"].tolist()


def test_with_masks_gives_instance_masks_aligned_with_boxes(coco_root: Path):
    source = COCODetection(str(coco_root), with_masks=True)
    val = source.dataset("val")
    raw = val[_index_of(val, "000000397133.jpg")]
    masks = raw["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
    assert masks.shape == (len(raw["boxes"]), 427, 640)
    out = source.build_transform(False, 128)(raw)
    assert out["masks"].shape == (len(out["boxes"]), 128, 128) and out["masks"].dtype == torch.uint8
    nonempty = out["masks"].flatten(1).amax(1) > 0
    assert nonempty.sum() >= 1
    mask_boxes = masks_to_boxes(out["masks"][nonempty])        # the mask's tight box (pixel indices, inclusive)
    boxes = out["boxes"][nonempty]
    assert (mask_boxes[:, :2] >= boxes[:, :2] - 1.5).all() and (mask_boxes[:, 2:] <= boxes[:, 2:] + 1.5).all()
    torch.manual_seed(0)
    train = source.build_transform(True, 64)(raw)              # lsj: masks follow the boxes kept
    assert train["masks"].shape == (len(train["boxes"]), 64, 64) == (len(train["labels"]), 64, 64)


# ----------------------------------------------------------------------------------------------------- transforms

def test_horizontal_flip_moves_boxes_hand_computed():
    # a 32 x 64 image at S = 64: scale 1, so the flip alone moves the box: x1' = W - x2, x2' = W - x1
    raw = _synthetic_sample(32, 64, [[10, 4, 20, 12]], block=(10, 4, 20, 12))
    t = DetectionTransform(True, 64, mean=MEAN, std=STD, policy="resize", hflip=1.0)
    out = t(raw)
    assert out["scale"] == 1.0 and out["image_size"].tolist() == [32, 64]
    assert out["boxes"].tolist() == [[44.0, 4.0, 54.0, 12.0]]
    white = (out["image"][0] > 0).nonzero()                   # the block's pixels moved with the box
    assert white[:, 1].min() == 44 and white[:, 1].max() == 53 and white[:, 0].min() == 4 and white[:, 0].max() == 11
    same = DetectionTransform(True, 64, mean=MEAN, std=STD, policy="resize", hflip=0.0)(raw)
    assert same["boxes"].tolist() == [[10.0, 4.0, 20.0, 12.0]]


def test_eval_resize_pads_bottom_right(bccd: VOCDetection):
    val = bccd.dataset("val")
    raw = val[0]
    out = bccd.build_transform(False, 64)(raw)                # 480 x 640 -> 48 x 64, scale 0.1
    assert out["image_size"].tolist() == [48, 64] and out["scale"] == pytest.approx(0.1)
    assert torch.allclose(out["boxes"], raw["boxes"].as_subclass(torch.Tensor) * 0.1, atol=1e-4)
    assert out["image"][:, 48:].abs().max() < 1e-5 and out["image"][:, :48].abs().max() > 0.1


def test_lsj_is_always_square_with_boxes_inside_the_valid_region(bccd: VOCDetection):
    raw = bccd.dataset("train")[0]
    t = bccd.build_transform(True, 64, policy="lsj", scale_range=(0.1, 2.0))
    base = 64 / 640
    sizes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = t(raw)
        assert out["image"].shape == (3, 64, 64)
        h, w = out["image_size"].tolist()
        sizes.add((h, w))
        assert 0.1 * base - 1e-6 <= out["scale"] <= 2.0 * base + 1e-6
        boxes = out["boxes"]
        assert len(boxes) == len(out["labels"]) == len(out["iscrowd"])
        if len(boxes):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()   # boxes cut below 1 px are dropped
        pad = torch.cat([out["image"][:, h:].flatten(), out["image"][:, :, w:].flatten()])
        assert pad.numel() == 0 or pad.abs().max() < 1e-5
    assert len(sizes) > 1                                     # the jitter varies the valid region


def test_transform_rejects_unknown_options(tmp_path: Path):
    with pytest.raises(ValueError, match="choose one of lsj, resize"):
        DetectionTransform(True, 64, policy="mosaic")
    with pytest.raises(ValueError, match="scale_range"):
        DetectionTransform(True, 64, scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="unknown detection augment option.*'rrc_scale'.*policy"):
        VOCDetection(str(tmp_path)).build_transform(True, 64, rrc_scale=(0.08, 1.0))


def test_collate_shapes(bccd: VOCDetection):
    ds = DenseDataset(bccd.dataset("val"), bccd.build_transform(True, 64))
    samples = [ds[i] for i in range(3)]
    batch = detection_collate(samples)
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].dtype == torch.float32
    for key in ("boxes", "labels", "iscrowd", "area"):
        assert isinstance(batch[key], list) and len(batch[key]) == 3
    assert all(b.shape[1:] == (4,) and b.dtype == torch.float32 for b in batch["boxes"])
    # the train crop drops boxes: the areas follow the boxes kept (VOC: the box's own area, original pixels)
    assert all(len(a) == len(b) for a, b in zip(batch["area"], batch["boxes"]))
    assert all(lab.dtype == torch.int64 for lab in batch["labels"])
    assert "masks" not in batch
    assert batch["image_id"].tolist() == [0, 1, 2] and batch["image_id"].dtype == torch.int64
    assert batch["orig_size"].shape == (3, 2) and batch["orig_size"][0].tolist() == [480, 640]
    assert batch["image_size"].shape == (3, 2) and batch["image_size"].dtype == torch.int64
    assert batch["scale"].shape == (3,) and batch["scale"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2] and batch["corrupt"].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="one size"):
        detection_collate([samples[0], {**samples[1], "image": torch.zeros(3, 32, 32)}])


# --------------------------------------------------------------------------------------------- synthetic trees

def test_voc_synthetic_classes_difficult_clipping_and_errors(tmp_path: Path, caplog):
    root = tmp_path / "voc"
    _write_voc(root, {"a": (20, 30, [("dog", 1, 1, 10, 10, 0), ("cat", 5, 5, 40, 25, 1)]),   # cat: clipped
                      "b": (20, 30, [("cat", 35, 2, 40, 8, 0), ("dog", 3, 3, 8, 8, 0)])},    # cat: outside
               {"train": ["a"], "val": ["b"]})
    source = VOCDetection(str(root))
    assert source.splits == ("train", "val") and source.class_names == ["cat", "dog"]
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        a = source.dataset("train")[0]
        b = source.dataset("val")[0]
    assert a["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [4.0, 4.0, 30.0, 20.0]]   # -1 shift, then clipped
    assert a["labels"].tolist() == [1, 0] and a["iscrowd"].tolist() == [0, 1]        # difficult -> crowd
    assert b["boxes"].tolist() == [[2.0, 2.0, 8.0, 8.0]] and source.dropped == {"train": 0, "val": 1}
    assert any("voc val: dropped 1 degenerate box" in r.getMessage() and "b.xml" in r.getMessage()
               for r in caplog.records)
    no_difficult = VOCDetection(str(root), keep_difficult=False).dataset("train")[0]
    assert no_difficult["labels"].tolist() == [0] and len(no_difficult["boxes"]) == 1   # classes: only dog left
    with pytest.raises(DataConfigError, match=r"a\.xml.*'cat'.*classes"):
        VOCDetection(str(root), classes=["dog"]).dataset("train")


def test_voc_unreadable_image_is_skipped(tmp_path: Path, caplog):
    root = tmp_path / "voc"
    _write_voc(root, {"a": (20, 30, [("dog", 1, 1, 10, 10, 0)]), "b": (20, 30, [("dog", 2, 2, 9, 9, 0)])},
               {"train": ["a", "b"]})
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    source = VOCDetection(str(root))
    ds = DenseDataset(source.dataset("train"), source.build_transform(False, 32))
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        sample = ds[0]
    assert sample["index"] == 1 and sample["corrupt"] == 1
    assert any("a.jpg" in r.getMessage() for r in caplog.records)


def test_coco_synthetic_ids_boxes_and_degenerate(tmp_path: Path, caplog):
    root = tmp_path / "coco"
    cats = [(9, "zebra"), (2, "bicycle"), (5, "airplane")]          # non-contiguous, unsorted ids
    _write_coco(root, "train", [(1, "one.jpg", 20, 30), (2, "two.jpg", 20, 30)],
                [(1, 5, [2, 3, 10, 5], 0), (1, 9, [0, 0, 4, 4], 1), (1, 2, [5, 5, 0, 6], 0)], cats)
    _write_coco(root, "val", [(3, "three.jpg", 20, 30)], [(3, 2, [1, 1, 3, 3], 0)], cats[:1])
    source = COCODetection(str(root))
    assert source.splits == ("train", "val")
    assert source.class_names == ["bicycle", "airplane", "zebra"]   # sorted by id: 2, 5, 9 -> 0, 1, 2
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        train = source.dataset("train")
    one, two = train[0], train[1]
    assert one["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [0.0, 0.0, 4.0, 4.0]]   # xywh -> xyxy
    assert one["labels"].tolist() == [1, 2] and one["iscrowd"].tolist() == [0, 1] and one["image_id"] == 1
    assert two["boxes"].shape == (0, 4) and two["labels"].shape == (0,)
    assert source.dropped["train"] == 1
    assert any("coco train: dropped 1 degenerate box" in r.getMessage() and "one.jpg" in r.getMessage()
               for r in caplog.records)
    # val lists fewer categories: the labels still come from train's
    assert source.dataset("val")[0]["labels"].tolist() == [0]
    masked = COCODetection(str(root), with_masks=True).dataset("train")[0]
    assert masked["masks"].shape == (2, 20, 30) and masked["masks"][0, 4, 10] == 1 and masked["masks"][0, 15, 25] == 0


def test_coco_unknown_category_is_an_error(tmp_path: Path):
    root = tmp_path / "coco"
    _write_coco(root, "train", [(1, "one.jpg", 20, 30)], [(1, 2, [2, 3, 10, 5], 0)], [(2, "bicycle")])
    _write_coco(root, "val", [(3, "three.jpg", 20, 30)], [(3, 77, [1, 1, 3, 3], 0)], [(77, "unicorn")])
    with pytest.raises(DataConfigError, match=r"instances_val2017\.json.*\[77\]"):
        COCODetection(str(root)).dataset("val")


def test_missing_folders_name_the_folder_and_layout(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match=r"no VOC data folder at .*nowhere.*JPEGImages"):
        VOCDetection(str(tmp_path / "nowhere")).check()
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"missing folder .*Annotations.*Pascal VOC layout"):
        VOCDetection(str(voc)).check()
    (voc / "Annotations").mkdir()
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"no split lists .*train\.txt"):
        VOCDetection(str(voc)).check()
    coco = tmp_path / "coco"
    coco.mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"missing folder .*annotations.*COCO layout"):
        COCODetection(str(coco)).check()
    _write_coco(coco, "val", [], [], [(1, "a")])
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DatasetNotFoundError, match=r"missing folder .*train2017"):
        COCODetection(str(coco)).check()
