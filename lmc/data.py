"""Datasets as tensors.

Small datasets are held whole as tensors (on the training device once moved there), so training and
evaluation index batches directly instead of going through a per-sample DataLoader.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmc.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "default_data_root", "load_dataset"]


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise ConfigError(f"unknown split '{name}'; valid: train, test")

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
        )


def default_data_root() -> Path:
    """``$DATA_DIR`` if set, else ``data/`` in the working directory."""
    return Path(os.environ.get("DATA_DIR", "data"))


def _mnist1d(root: Path) -> Dataset:
    """MNIST-1D (Greydanus & Kobak, 2024), generated locally with ``mnist1d.data.make_dataset`` and its
    default arguments (4000 train / 1000 test sequences of length 40, 10 classes). The generated arrays
    are cached as ``<root>/mnist1d/mnist1d_default.npz``; nothing is downloaded."""
    cache = root / "mnist1d" / "mnist1d_default.npz"
    arrays = None
    if cache.exists():
        try:
            with np.load(cache) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # noqa: BLE001 - a broken cache is regenerated
            arrays = None
    if arrays is None:
        from mnist1d.data import make_dataset

        # make_dataset seeds the global numpy/random RNGs; keep the caller's state intact
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            ds = make_dataset()
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: ds[k] for k in ("x", "y", "x_test", "y_test")}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache)
        except OSError:
            pass  # caching is an optimisation; an unwritable root is fine
    return Dataset(
        "mnist1d",
        torch.as_tensor(arrays["x"], dtype=torch.float32),
        torch.as_tensor(arrays["y"], dtype=torch.long),
        torch.as_tensor(arrays["x_test"], dtype=torch.float32),
        torch.as_tensor(arrays["y_test"], dtype=torch.long),
        10,
    )


DATASETS = {"mnist1d": _mnist1d}


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load dataset ``name`` from ``root`` (default: :func:`default_data_root`)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](Path(root) if root else default_data_root())
