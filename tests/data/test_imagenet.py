"""ImageNet (ILSVRC-2012) layouts: train/<wnid>/, val/ in class folders or flat with devkit or Kaggle labels."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from tests.conftest import CONF
from vitlab.data.base import DatasetNotFoundError, DictDataset
from vitlab.data.imagenet import ImageNet, parse_meta_mat
from vitlab.data.transforms import build_transforms

# three real ILSVRC-2012 synsets; each class has its own colour so a label can be read off the pixels
COLOURS = {"n01440764": (250, 0, 0), "n01443537": (0, 250, 0), "n01484850": (0, 0, 250)}
WNIDS = sorted(COLOURS)
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"}
# ILSVRC2012_IDs in the devkit do not follow sorted wnid order (ID 1 is n01751748 in the real one): scramble them
IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
VAL_WNIDS = ["n01443537", "n01440764", "n01484850", "n01484850", "n01440764", "n01443537", "n01440764",
             "n01484850", "n01443537"]                       # the class of val image k+1, in file-name order
SYNSET_FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images"]


def _jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).save(path, "JPEG", quality=95)


def _label_of(image: Image.Image) -> int:
    """The class whose colour is nearest the image's mean (JPEG shifts solid colours slightly)."""
    mean = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(mean - np.array(COLOURS[w])).sum() for w in WNIDS]))


def _write_devkit(folder: Path, gt_wnids: list[str] = VAL_WNIDS) -> Path:
    """ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt} as the real devkit has them:
    ``synsets`` is a struct array over leaf and non-leaf synsets; the leaves are the classes."""
    devkit = folder / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    rows = [(IDS[w], w, WORDS[w], f"gloss of {w}", 0, np.zeros((0,), np.uint16), 0, 1300) for w in WNIDS]
    rows.append((1001, "n01439121", "cyprinid, cyprinid fish", "a non-leaf synset", 2,
                 np.array([2, 3], np.uint16), 1, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for i, row in enumerate(rows):
        for field, value in zip(SYNSET_FIELDS, row):
            synsets[i, 0][field] = value
    scipy.io.savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{IDS[w]}\n" for w in gt_wnids))
    return devkit


def _write_train(root: Path, per_class: int = 3) -> None:
    for w in WNIDS:
        for i in range(per_class):
            _jpeg(root / "train" / w / f"{w}_{i}.JPEG", COLOURS[w])


def _write_flat_val(root: Path) -> list[int]:
    for k, w in enumerate(VAL_WNIDS, 1):
        _jpeg(root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", COLOURS[w])
    return [WNIDS.index(w) for w in VAL_WNIDS]


def _write_val_folders(root: Path) -> None:
    for k, w in enumerate(VAL_WNIDS, 1):
        _jpeg(root / "val" / w / f"ILSVRC2012_val_{k:08d}.JPEG", COLOURS[w])


def _assert_labels_match_pixels(ds) -> None:
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == _label_of(image) == ds.label_of(i)
        assert Path(ds.path_of(i)).is_file()


@pytest.fixture
def flat(tmp_path) -> Path:
    _write_train(tmp_path)
    _write_flat_val(tmp_path)
    return tmp_path


def test_fake_meta_mat_has_the_layout_torchvision_reads(tmp_path):
    # torchvision's parse_devkit_archive reads positionally: fields 0..2 = ID, WNID, words; field 4 = num_children
    devkit = _write_devkit(tmp_path)
    meta = scipy.io.loadmat(devkit / "data" / "meta.mat", squeeze_me=True)["synsets"]
    leaves = [s for s, n in zip(meta, list(zip(*meta))[4]) if n == 0]
    ids, wnids, words = list(zip(*leaves))[:3]
    assert dict(zip(ids, wnids)) == {v: k for k, v in IDS.items()}
    assert dict(zip(wnids, words)) == WORDS
    idx_to_wnid, wnid_to_words = parse_meta_mat(devkit / "data" / "meta.mat")
    assert idx_to_wnid == dict(zip(ids, wnids))                   # the non-leaf 1001 is dropped
    assert wnid_to_words["n01440764"] == ("tench", "Tinca tinca")


def test_train_labels_are_sorted_wnids(tmp_path):
    _write_train(tmp_path)
    _write_val_folders(tmp_path)
    src = ImageNet(str(tmp_path))
    src.check()
    assert src.num_classes == 3 and src.splits == ("train", "val")
    assert src.class_names == WNIDS                                # no devkit: the wnids
    train = src.dataset("train")
    assert len(train) == 9
    _assert_labels_match_pixels(train)
    assert [Path(train.path_of(i)).parent.name for i in range(9)] == [w for w in WNIDS for _ in range(3)]
    item = DictDataset(train, build_transforms(False, 8, src.mean, src.std))[0]
    assert item["image"].shape == (3, 8, 8) and int(item["label"]) == 0


@pytest.mark.parametrize("as_archive", [False, True])
def test_flat_val_with_devkit(flat, as_archive):
    devkit = _write_devkit(flat / "kit")
    if as_archive:
        with tarfile.open(flat / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            tar.add(devkit, arcname="ILSVRC2012_devkit_t12")
    else:
        shutil.move(devkit, flat / "ILSVRC2012_devkit_t12")
    shutil.rmtree(flat / "kit")
    src = ImageNet(str(flat))
    src.check()
    assert src.class_names == ["tench", "goldfish", "great white shark"]
    val = src.dataset("val")
    assert [val.label_of(i) for i in range(len(val))] == [WNIDS.index(w) for w in VAL_WNIDS]
    assert [Path(val.path_of(i)).name for i in range(3)] == [f"ILSVRC2012_val_{k:08d}.JPEG" for k in (1, 2, 3)]
    _assert_labels_match_pixels(val)
    assert not list(flat.glob("**/meta.mat")) or not as_archive   # the archive is read in memory, not extracted


def test_devkit_given_as_a_path(flat, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("devkits")
    _write_devkit(elsewhere)
    for devkit in (elsewhere, elsewhere / "ILSVRC2012_devkit_t12"):  # the parent or the devkit folder itself
        val = ImageNet(str(flat), devkit=str(devkit)).dataset("val")
        assert [val.label_of(i) for i in range(len(val))] == [WNIDS.index(w) for w in VAL_WNIDS]
    with pytest.raises(DatasetNotFoundError, match="data.source.devkit=.*does not exist"):
        ImageNet(str(flat), devkit=str(elsewhere / "nope")).check()


def test_val_in_class_folders(tmp_path):
    _write_train(tmp_path)
    _write_val_folders(tmp_path)
    src = ImageNet(str(tmp_path))
    src.check()
    val = src.dataset("val")
    assert len(val) == 9
    _assert_labels_match_pixels(val)
    assert sorted(val.label_of(i) for i in range(9)) == sorted(WNIDS.index(w) for w in VAL_WNIDS)


def test_flat_val_with_kaggle_solution(flat):
    lines = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{k:08d},{w} 1 2 30 40 {w} 5 6 7 8"
                                            for k, w in reversed(list(enumerate(VAL_WNIDS, 1)))]
    (flat / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (flat / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in WNIDS))
    src = ImageNet(str(flat))
    src.check()
    val = src.dataset("val")
    assert [val.label_of(i) for i in range(len(val))] == [WNIDS.index(w) for w in VAL_WNIDS]
    _assert_labels_match_pixels(val)
    assert src.class_names == ["tench", "goldfish", "great white shark"]


def test_kaggle_download_folder_as_root(tmp_path):
    images = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    _write_train(images)
    _write_flat_val(images)
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{k:08d},{w} 1 2 3 4\n" for k, w in enumerate(VAL_WNIDS, 1)))
    for root in (tmp_path, images):                                # the download folder, or its CLS-LOC
        val = ImageNet(str(root)).dataset("val")
        assert [val.label_of(i) for i in range(len(val))] == [WNIDS.index(w) for w in VAL_WNIDS]


def test_no_test_split(flat):
    src = ImageNet(str(flat))
    assert not src.has_split("test")
    with pytest.raises(DatasetNotFoundError, match="never published.*split=val"):
        src.dataset("test")


def test_missing_train_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        ImageNet(str(tmp_path / "absent")).check()
    msg = str(info.value)
    assert "train/<wnid>/*.JPEG" in msg and "data.root" in msg


def test_flat_val_without_labels(flat):
    with pytest.raises(DatasetNotFoundError) as info:
        ImageNet(str(flat)).check()
    msg = str(info.value)
    assert "9 images but no class folders" in msg
    assert "ILSVRC2012_devkit_t12.tar.gz" in msg and "data.source.devkit" in msg and "val/<wnid>" in msg


def test_ground_truth_length_mismatch(flat):
    _write_devkit(flat, gt_wnids=VAL_WNIDS[:7])
    with pytest.raises(DatasetNotFoundError, match="has 7 labels but .* holds 9 images"):
        ImageNet(str(flat)).check()


def test_missing_val_folder_and_foreign_val_class(tmp_path):
    _write_train(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="no ImageNet val folder"):
        ImageNet(str(tmp_path)).check()
    _jpeg(tmp_path / "val" / "n09999999" / "x.JPEG", (1, 2, 3))
    with pytest.raises(DatasetNotFoundError, match="class folder.*train/ lacks.*n09999999"):
        ImageNet(str(tmp_path)).check()


def test_corrupt_image_raises_unchanged(flat):
    _write_devkit(flat)
    (flat / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").write_bytes(b"not a jpeg")
    train = ImageNet(str(flat)).dataset("train")
    with pytest.raises(OSError):                                   # PIL.UnidentifiedImageError, for DictDataset
        train[0]
    assert train.label_of(0) == 0 and train.path_of(0).endswith("_0.JPEG")


def test_conf_composes_and_instantiates(flat):
    _write_devkit(flat)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=imagenet", f"data.root={flat}"])
    assert cfg.data.img_size == 224 and cfg.data.repeated_aug == 0 and cfg.data.mixup.mixup_alpha == 0.0
    src = instantiate(cfg.data.source, _convert_="all")
    assert isinstance(src, ImageNet)
    src.check()
    assert src.num_classes == 3 and len(src.dataset("val")) == 9
