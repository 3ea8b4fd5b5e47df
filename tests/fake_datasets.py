"""Tiny datasets fabricated for tests: in memory (:func:`tiny_data`), and in the real on-disk formats
torchvision reads.

``fabricate(name, root, n_train, n_test)`` writes CIFAR-10/100 pickled batches, MNIST/Fashion-MNIST
idx files (gzipped and extracted, as a torchvision download leaves them) or SVHN ``.mat`` files under
``root``; labels cycle through all classes and images are random but fixed by ``seed``.
torchvision checks the md5 sums of CIFAR and SVHN files against the real ones:
:func:`skip_md5_checks` (a ``monkeypatch`` helper) turns that check into an existence check, for tests only.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np

FAKE_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")


def tiny_data(n: int, n_test: int = 64, features: int = 2):
    """``n`` fixed Gaussian points in 8-D, labelled by whether their first ``features`` coordinates sum
    above 0 (two classes); the test set is the first ``n_test`` of them."""
    import torch

    from lmc.core.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :features].sum(1) > 0).long()
    return Dataset("tiny", x, y, x[:n_test], y[:n_test], 2)


def skip_md5_checks(monkeypatch) -> None:
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    exists = lambda fpath, md5=None: os.path.isfile(fpath)
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def _labels(n: int, num_classes: int, rng) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def _idx(path: Path, array: np.ndarray) -> None:
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data)
    with gzip.open(f"{path}.gz", "wb") as f:
        f.write(data)


def _mnist(root: Path, folder: str, n_train: int, n_test: int, rng) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", _labels(n, 10, rng))


def _cifar(root: Path, num_classes: int, n_train: int, n_test: int, rng) -> None:
    def batch(n):
        return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), _labels(n, num_classes, rng).tolist()

    def dump(path: Path, obj) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if num_classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        per = np.array_split(np.arange(n_train), 5)
        for i, part in enumerate(per, 1):
            data, labels = batch(len(part))
            dump(base / f"data_batch_{i}", {"data": data, "labels": labels})
        data, labels = batch(n_test)
        dump(base / "test_batch", {"data": data, "labels": labels})
        dump(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("test", n_test)):
            data, labels = batch(n)
            dump(base / name, {"data": data, "fine_labels": labels, "coarse_labels": [y // 5 for y in labels]})
        dump(base / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})


def _svhn(root: Path, n_train: int, n_test: int, rng) -> None:
    from scipy.io import savemat

    base = root / "svhn"
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = _labels(n, 10, rng)
        y[y == 0] = 10  # SVHN stores digit 0 as label 10
        savemat(base / f"{split}_32x32.mat", {"X": x, "y": y[:, None].astype(np.uint8)})


def fabricate(name: str, root: str | os.PathLike, n_train: int = 100, n_test: int = 40, seed: int = 0) -> Path:
    """Write a tiny ``name`` dataset in torchvision's layout under ``root``; returns ``root``."""
    root, rng = Path(root), np.random.default_rng(seed)
    if name in ("mnist", "fashion_mnist"):
        _mnist(root, "MNIST" if name == "mnist" else "FashionMNIST", n_train, n_test, rng)
    elif name in ("cifar10", "cifar100"):
        _cifar(root, 10 if name == "cifar10" else 100, n_train, n_test, rng)
    elif name == "svhn":
        _svhn(root, n_train, n_test, rng)
    else:
        raise ValueError(f"no fake dataset '{name}'; valid: {', '.join(FAKE_NAMES)}")
    return root
