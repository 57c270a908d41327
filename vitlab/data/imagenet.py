"""ImageNet-1k (ILSVRC-2012) in its usual on-disk layouts.

``root/train/<wnid>/*.JPEG`` and ``root/val/``, where val is either

(a) sorted into class folders ``val/<wnid>/*.JPEG``, or
(b) flat ``val/ILSVRC2012_val_00000001.JPEG ...`` (as ``ILSVRC2012_img_val.tar``
    extracts), labelled by the official devkit
    (``ILSVRC2012_devkit_t12/data/meta.mat`` + ``ILSVRC2012_validation_ground_truth.txt``,
    found under root as the folder or the ``ILSVRC2012_devkit_t12.tar.gz``
    archive, or given as ``devkit=PATH``), or else by Kaggle's
    ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the string starts with the wnid).

Kaggle's download folder works as root too: its images sit under
``ILSVRC/Data/CLS-LOC/`` and ``LOC_val_solution.csv`` / ``LOC_synset_mapping.txt``
at the top. Label indices are the sorted wnids of ``train/`` (as torchvision's
ImageNet); class names are the first synonym of each synset from the devkit
(or ``LOC_synset_mapping.txt``), else the wnids. There is no test split: the
test labels were never published.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from functools import cached_property
from pathlib import Path

from torchvision.datasets.folder import (
    IMG_EXTENSIONS,
    has_file_allowed_extension,
    make_dataset,
)

from vitlab.data.base import ClassificationSource, DatasetNotFoundError
from vitlab.data.filelist import FileDataset

DEVKIT = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_IMAGES = Path("ILSVRC/Data/CLS-LOC")          # relative to Kaggle's download folder
_SHOW = 5


def parse_meta_mat(data: bytes | str | os.PathLike) -> tuple[dict[int, str], dict[str, tuple[str, ...]]]:
    """meta.mat -> (ILSVRC2012_ID -> wnid, wnid -> synonyms) over the 1000 leaf synsets.

    The same reading as torchvision's ``parse_devkit_archive`` (whose parser is
    a nested function, so it cannot be reused): ``synsets`` is a struct array
    (ILSVRC2012_ID, WNID, words, gloss, num_children, children, wordnet_height,
    num_train_images); the leaves (``num_children == 0``) are the 1000 classes.
    """
    import scipy.io

    source = io.BytesIO(data) if isinstance(data, bytes) else os.fspath(data)
    synsets = scipy.io.loadmat(source, squeeze_me=True)["synsets"]
    idx_to_wnid, wnid_to_words = {}, {}
    for s in synsets.ravel():
        if int(s["num_children"]) != 0:
            continue
        wnid = str(s["WNID"])
        idx_to_wnid[int(s["ILSVRC2012_ID"])] = wnid
        wnid_to_words[wnid] = tuple(str(s["words"]).split(", "))
    return idx_to_wnid, wnid_to_words


def parse_ground_truth(text: str) -> list[int]:
    """ILSVRC2012_validation_ground_truth.txt -> one ILSVRC2012_ID per val image, in file-name order."""
    return [int(line) for line in text.split()]


def _read_devkit(devkit: Path) -> tuple[bytes, str | None]:
    """(meta.mat bytes, ground-truth text or None) from a devkit folder or its .tar.gz, read in memory."""
    if devkit.is_file():
        with tarfile.open(devkit) as tar:                  # 2.5 MB: read the two members, extract nothing
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            if META_MAT not in members:
                raise DatasetNotFoundError(f"{devkit} holds no {DEVKIT}/{META_MAT}; is it the ILSVRC-2012 devkit "
                                           f"({DEVKIT}.tar.gz)?")
            meta = tar.extractfile(members[META_MAT]).read()
            gt = tar.extractfile(members[GROUND_TRUTH]).read().decode() if GROUND_TRUTH in members else None
            return meta, gt
    folder = devkit / DEVKIT if (devkit / DEVKIT / META_MAT).is_file() else devkit
    if not (folder / META_MAT).is_file():
        raise DatasetNotFoundError(f"the devkit at {devkit} has no {META_MAT}; set data.source.devkit to the "
                                   f"extracted {DEVKIT} folder or to {DEVKIT}.tar.gz")
    gt = folder / GROUND_TRUTH
    return (folder / META_MAT).read_bytes(), gt.read_text() if gt.is_file() else None


def _is_image(name: str) -> bool:
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


class ImageNet(ClassificationSource):
    """ILSVRC-2012 classification: train/ in wnid folders, val/ in wnid folders or flat with devkit labels."""

    name = "imagenet"
    splits = ("train", "val")

    def __init__(self, root: str, devkit: str | None = None):
        self.root = Path(root).expanduser()
        self.devkit_arg = Path(devkit).expanduser() if devkit else None
        self._val_cache: list[tuple[str, int]] | None = None

    # ------------------------------------------------------------ layout ---
    @property
    def image_root(self) -> Path:
        """The folder holding train/ and val/: root itself, or Kaggle's ILSVRC/Data/CLS-LOC under it."""
        if not (self.root / "train").is_dir() and (self.root / KAGGLE_IMAGES / "train").is_dir():
            return self.root / KAGGLE_IMAGES
        return self.root

    def _kaggle_file(self, name: str) -> Path | None:
        """A Kaggle top-level file (LOC_*) in root, or in the download folder when root is its CLS-LOC."""
        candidates = [self.root / name]
        if self.root.resolve().parts[-3:] == KAGGLE_IMAGES.parts:
            candidates.append(self.root.resolve().parents[2] / name)
        return next((p for p in candidates if p.is_file()), None)

    def _devkit_path(self) -> Path | None:
        if self.devkit_arg is not None:
            if not self.devkit_arg.exists():
                raise DatasetNotFoundError(f"data.source.devkit={self.devkit_arg} does not exist; point it at the "
                                           f"extracted {DEVKIT} folder or {DEVKIT}.tar.gz, or set it to null")
            return self.devkit_arg
        for p in (self.root / DEVKIT, self.root / f"{DEVKIT}.tar.gz"):
            if p.exists():
                return p
        return None

    @cached_property
    def _devkit(self) -> tuple[dict[int, str], dict[str, tuple[str, ...]], list[int] | None] | None:
        """(ID -> wnid, wnid -> synonyms, val ground-truth IDs or None), or None without a devkit."""
        path = self._devkit_path()
        if path is None:
            return None
        meta, gt = _read_devkit(path)
        idx_to_wnid, wnid_to_words = parse_meta_mat(meta)
        return idx_to_wnid, wnid_to_words, parse_ground_truth(gt) if gt is not None else None

    @cached_property
    def wnids(self) -> list[str]:
        """The train/ class folders, sorted: their order defines the label index."""
        train = self.image_root / "train"
        if not train.is_dir():
            return []
        return sorted(e.name for e in os.scandir(train) if e.is_dir())

    @property
    def class_names(self) -> list[str]:
        if self._devkit is not None:
            words = self._devkit[1]
            return [words[w][0] if w in words else w for w in self.wnids]
        mapping = self._kaggle_file("LOC_synset_mapping.txt")      # "n01440764 tench, Tinca tinca"
        if mapping is not None:
            names = dict(line.strip().split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
            return [names.get(w, w).split(", ")[0] for w in self.wnids]
        return list(self.wnids)

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def missing_split_message(self, split: str) -> str:
        if split == "test":
            return ("ImageNet (ILSVRC-2012) has no labelled test split: its test labels were never published. "
                    "Evaluate on split=val (the number papers report as ImageNet top-1).")
        return super().missing_split_message(split)

    # ------------------------------------------------------------- check ---
    def check(self) -> None:
        train = self.image_root / "train"
        if not self.wnids:
            raise DatasetNotFoundError(
                f"no ImageNet train folders at {train}. Lay the data out as {self.root}/train/<wnid>/*.JPEG "
                "(extract ILSVRC2012_img_train.tar there, then each per-class tar into its wnid folder) with "
                f"val/ beside it, point data.root at that folder (Kaggle's download folder works too), or use "
                "data=imagefolder for other class-folder data.")
        self._val_samples()                                        # resolves the val labels; raises when it cannot

    # -------------------------------------------------------------- val ---
    def _val_samples(self) -> list[tuple[str, int]]:
        """(path, label) of every val image; cached after the first successful call."""
        if self._val_cache is None:
            self._val_cache = self._scan_val()
        return self._val_cache

    def _scan_val(self) -> list[tuple[str, int]]:
        val = self.image_root / "val"
        if not val.is_dir():
            raise DatasetNotFoundError(f"no ImageNet val folder at {val}. Extract ILSVRC2012_img_val.tar into it "
                                       "(flat, labelled by the devkit) or lay it out as val/<wnid>/*.JPEG.")
        entries = list(os.scandir(val))
        class_to_idx = {w: i for i, w in enumerate(self.wnids)}
        folders = sorted(e.name for e in entries if e.is_dir())
        if folders:                                                # (a) val/<wnid>/*
            unknown = [f for f in folders if f not in class_to_idx]
            if unknown:
                raise DatasetNotFoundError(
                    f"{val} has {len(unknown)} class folder(s) that train/ lacks, e.g. {', '.join(unknown[:_SHOW])}; "
                    "train/ and val/ must use the same wnid folders.")
            samples = make_dataset(str(val), {f: class_to_idx[f] for f in folders}, extensions=IMG_EXTENSIONS,
                                   allow_empty=True)
            if not samples:
                raise DatasetNotFoundError(f"the class folders of {val} hold no images ({', '.join(IMG_EXTENSIONS)})")
            return samples
        files = sorted(e.path for e in entries if e.is_file() and _is_image(e.name))
        if not files:
            raise DatasetNotFoundError(f"{val} holds no images; extract ILSVRC2012_img_val.tar into it")
        return self._label_flat_val(val, files, class_to_idx)

    def _label_flat_val(self, val: Path, files: list[str], class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        """(b) flat val/: labels from the devkit's ground truth, else from Kaggle's LOC_val_solution.csv."""
        devkit = self._devkit
        if devkit is not None and devkit[2] is not None:
            idx_to_wnid, _, ids = devkit
            if len(ids) != len(files):
                raise DatasetNotFoundError(
                    f"the devkit's {Path(GROUND_TRUTH).name} has {len(ids)} labels but {val} holds {len(files)} "
                    "images; they pair up in file-name order, so val/ must hold exactly the images the ground "
                    "truth lists (all 50,000 of ILSVRC2012_img_val.tar), or sort val/ into val/<wnid>/ folders.")
            unknown_ids = sorted({i for i in ids if i not in idx_to_wnid})
            if unknown_ids:
                raise DatasetNotFoundError(f"the devkit ground truth uses ILSVRC2012_IDs that meta.mat lacks as leaf "
                                           f"synsets, e.g. {unknown_ids[:_SHOW]}; is the devkit the 2012 one?")
            wnids = [idx_to_wnid[i] for i in ids]
            source = "the devkit ground truth"
        else:
            csv_path = self._kaggle_file("LOC_val_solution.csv")
            if csv_path is None:
                raise DatasetNotFoundError(
                    f"{val} holds {len(files)} images but no class folders, and no labels were found for them. "
                    f"Add the devkit ({DEVKIT}.tar.gz or the extracted folder) to {self.root} or set "
                    f"data.source.devkit=PATH, put Kaggle's LOC_val_solution.csv in {self.root}, or use class "
                    "folders (val/<wnid>/*.JPEG).")
            with open(csv_path, newline="") as f:
                solution = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
            stems = [Path(p).stem for p in files]
            unlabelled = [s for s in stems if s not in solution]
            if unlabelled:
                raise DatasetNotFoundError(f"{len(unlabelled)} of {len(files)} images in {val} have no row in "
                                           f"{csv_path}, e.g. {', '.join(unlabelled[:_SHOW])}")
            wnids = [solution[s] for s in stems]
            source = str(csv_path)
        foreign = sorted({w for w in wnids if w not in class_to_idx})
        if foreign:
            raise DatasetNotFoundError(f"{source} labels val images with {len(foreign)} wnid(s) that train/ has no "
                                       f"folder for, e.g. {', '.join(foreign[:_SHOW])}; train/ needs every class.")
        return [(p, class_to_idx[w]) for p, w in zip(files, wnids)]

    # ------------------------------------------------------------- load ---
    def _load(self, split: str) -> FileDataset:
        self.check()
        if split == "val":
            samples = self._val_samples()
        else:
            try:
                samples = make_dataset(str(self.image_root / "train"), {w: i for i, w in enumerate(self.wnids)},
                                       extensions=IMG_EXTENSIONS)
            except FileNotFoundError as e:                         # a wnid folder without images
                raise DatasetNotFoundError(f"{self.image_root / 'train'}: {e} Remove the empty folders or extract "
                                           "their images.") from e
        return FileDataset([p for p, _ in samples], [label for _, label in samples])
