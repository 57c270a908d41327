"""Shared fixtures for the data-layer tests: the shared real data, fake CIFAR folders and a local HTTP server."""

from __future__ import annotations

import hashlib
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of small real datasets (env VITLAB_SHARED_DATA, default ../shared/data from the repo root)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent; set VITLAB_SHARED_DATA to where it lives")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar10_subset_root(shared_data: Path) -> Path:
    root = shared_data / "cifar10-subset"
    if not (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"{root}/cifar-10-batches-py is absent from the shared data folder")
    return root


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _batch(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, num_classes, size=n).tolist()


def _write_fake_cifar10(root: Path, n_per_batch: int = 4, n_test: int = 5, seed: int = 0) -> dict:
    """Write ``root/cifar-10-batches-py`` in the official format; return the arrays written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data, labels = _batch(rng, n_per_batch, 10)
        _dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "data": data,
                                           "labels": labels, "filenames": [f"{i}_{j}.png" for j in range(n_per_batch)]})
        train_data.append(data)
        train_labels += labels
    test_data, test_labels = _batch(rng, n_test, 10)
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": test_data, "labels": test_labels})
    _dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": n_per_batch,
                                    "num_vis": 3072})
    return {"train_data": np.concatenate(train_data), "train_labels": np.asarray(train_labels),
            "test_data": test_data, "test_labels": np.asarray(test_labels)}


def _write_fake_cifar100(root: Path, n_train: int = 20, n_test: int = 6, seed: int = 1) -> dict:
    """Write ``root/cifar-100-python`` (train/test/meta with fine labels); return the arrays written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_data, train_labels = _batch(rng, n_train, 100)
    test_data, test_labels = _batch(rng, n_test, 100)
    coarse = lambda labels: [label // 5 for label in labels]  # noqa: E731
    _dump(folder / "train", {"data": train_data, "fine_labels": train_labels, "coarse_labels": coarse(train_labels)})
    _dump(folder / "test", {"data": test_data, "fine_labels": test_labels, "coarse_labels": coarse(test_labels)})
    names = [f"class_{i:02d}" for i in range(100)]
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return {"train_data": train_data, "train_labels": np.asarray(train_labels), "test_data": test_data,
            "test_labels": np.asarray(test_labels), "names": names}


@pytest.fixture
def write_fake_cifar10():
    """``write_fake_cifar10(root) -> arrays``: a tiny official-format CIFAR-10 folder (5 train batches + test)."""
    return _write_fake_cifar10


@pytest.fixture
def write_fake_cifar100():
    """``write_fake_cifar100(root) -> arrays``: a tiny official-format CIFAR-100 folder (train, test, meta)."""
    return _write_fake_cifar100


@pytest.fixture
def fake_cifar10_archive(tmp_path: Path) -> dict:
    """A tiny CIFAR-10 archive ``tmp_path/serve/cifar-10-python.tar.gz`` with its md5 and the arrays inside."""
    src = tmp_path / "src"
    arrays = _write_fake_cifar10(src)
    serve = tmp_path / "serve"
    serve.mkdir()
    archive = serve / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    return {"dir": serve, "archive": archive, "md5": md5, **arrays}


@pytest.fixture
def closed_port(monkeypatch) -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
