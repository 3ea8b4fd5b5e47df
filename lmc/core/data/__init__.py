"""Datasets as tensors, augmentation on whole batches, and disjoint splits.

Small datasets are held whole as tensors on the training device: images are read once with
torchvision's dataset classes (uint8), moved to the device, converted to float and normalised there,
so training and evaluation index batches directly instead of going through a per-sample DataLoader.
Augmentation (random crop with padding, horizontal flip) runs on whole batches on the device, drawn
from its own generator (``aug_seed``), separate from model init and data order.

Fetch a dataset once before a sweep, so parallel jobs never race to download it::

    python -m lmc.data download cifar10 [--root DIR]

Tabular classification data (:mod:`lmc.core.data.tabular`): ``digits``, ``breast_cancer`` and
``mnist1d_tabular`` (embedded), ``openml`` (an OpenML table fetched once, ``data.id``) and ``table`` (a
CSV/Parquet file, ``data.path``, ``data.target``), split and quantile-transformed by their readers.

Besides the built-in datasets: your own tensors in a file (``tensors``: ``.npz`` or ``.pt`` holding
``x_train, y_train, x_test, y_test``), or your own loader named by its import path (a class or
function returning those four arrays). Every loaded dataset carries a fingerprint, the sha256 of the
arrays actually loaded, so that results computed on other data are never mistaken for these.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from lmc.core.data.tabular import read_embedded, read_openml_dataset, read_table_file
from lmc.errors import ConfigError
from lmc.settings import locate, parse_options

__all__ = ["ARRAYS", "DATASETS", "REQUIRED", "SPLITS", "Augmentation", "Dataset", "default_data_root", "download",
           "fingerprint", "from_options", "load_arrays", "load_dataset", "reader_options", "split_pair", "tensors"]

ARRAYS = ("x_train", "y_train", "x_test", "y_test")  # what every dataset provides


@dataclass
class Augmentation:
    """Random crop after padding every side by ``crop_padding`` pixels (reflect padding, as in
    KellerJordan/cifar10-airbench), then a horizontal flip with probability 1/2 if ``flip``.
    Applied to a whole batch of images ``(N, C, H, W)`` with one generator on the batch's device."""

    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be a non-negative integer, got {self.crop_padding}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}; "
                              "set data.augment=false")
        n, c, h, w = x.shape
        p = self.crop_padding
        if p:
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chans = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = torch.rand(n, device=x.device, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Augmentation | None = field(default=None, compare=False)  # applied to training batches
    fingerprint: str = ""  # sha256 of the arrays as loaded (before normalisation): the data's store identity

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
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))


def default_data_root() -> Path:
    """``$DATA_DIR`` if set, else ``data/`` in the working directory."""
    return Path(os.environ.get("DATA_DIR", "data"))


def _mnist1d(root: Path, download: bool = False) -> tuple[np.ndarray, ...]:
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
    return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]


def _torchvision(cls_name: str, folder: str, svhn: bool = False):
    """Reader for a torchvision dataset class: ``(x_train, y_train, x_test, y_test)`` as numpy arrays,
    images ``uint8`` in ``(N, C, H, W)``. ``folder`` (under root) is only used for messages; SVHN's
    files live in ``<root>/svhn/``, the others where torchvision puts them."""

    def read(root: Path, download: bool = False):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        arrays = []
        try:
            for train in (True, False):
                if svhn:
                    ds = cls(str(root / "svhn"), split="train" if train else "test", download=download)
                    images, labels = ds.data, ds.labels  # already (N, C, H, W)
                else:
                    ds = cls(str(root), train=train, download=download)
                    images, labels = np.asarray(ds.data), np.asarray(ds.targets)
                    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
                arrays += [np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)]
        except (OSError, RuntimeError) as exc:
            name = _NAME_OF[cls_name]
            if download:  # no network, a mirror down, a full disk...
                raise ConfigError(f"could not download {name} into {root}: {exc}".replace("\n", " ")) from exc
            if not isinstance(exc, RuntimeError):
                raise
            raise ConfigError(f"dataset {name} not found (or corrupted) under {root / folder}; fetch it once "
                              f"with `python -m lmc.data download {name} --root {root}` "
                              "or set data.download=true") from exc
        return tuple(arrays)

    return read


def tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A user's dataset from one file: ``.npz`` (``numpy.savez``) or ``.pt`` (``torch.save`` of a dict)
    holding ``x_train, y_train, x_test, y_test``; labels are integers 0..C−1 (C counted from them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path '{path}' is not a file; give an .npz or .pt file holding "
                          f"{', '.join(ARRAYS)}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        elif path.suffix == ".pt":
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"data.path '{path}' must end in .npz or .pt, got '{path.suffix}'")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one line
        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise ConfigError(f"data.path '{path}' cannot be read ({why})") from None
    if not isinstance(arrays, Mapping):
        raise ConfigError(f"data.path '{path}' holds a {type(arrays).__name__}; it must hold a dict of "
                          f"{', '.join(ARRAYS)}")
    return dict(arrays)


_NAME_OF = {"MNIST": "mnist", "FashionMNIST": "fashion_mnist", "CIFAR10": "cifar10", "CIFAR100": "cifar100",
            "SVHN": "svhn"}

# name -> (reader, number of classes; None: counted from the labels)
DATASETS: dict[str, tuple[Callable, int | None]] = {
    "mnist1d": (_mnist1d, 10),
    "mnist": (_torchvision("MNIST", "MNIST/raw"), 10),
    "fashion_mnist": (_torchvision("FashionMNIST", "FashionMNIST/raw"), 10),
    "cifar10": (_torchvision("CIFAR10", "cifar-10-batches-py"), 10),
    "cifar100": (_torchvision("CIFAR100", "cifar-100-python"), 100),
    "svhn": (_torchvision("SVHN", "svhn", svhn=True), 10),
    "tensors": (tensors, None),
    "digits": (read_embedded("digits"), 10),
    "breast_cancer": (read_embedded("breast_cancer"), 2),
    "mnist1d_tabular": (read_embedded("mnist1d_tabular"), 10),
    "openml": (read_openml_dataset, None),
    "table": (read_table_file, None),
}
# what a built-in dataset needs set (data.<key>=...) before it can be read
REQUIRED: dict[str, dict[str, str]] = {
    "tensors": {"path": "<file.npz or file.pt> holding x_train, y_train, x_test, y_test"},
    "openml": {"id": "<OpenML dataset id> (fetched once by `python -m lmc.data download openml:<id>`)"},
    "table": {"path": "<a CSV or Parquet file>", "target": "<its label column>"},
}


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; valid: {', '.join(sorted(DATASETS))}")


def fingerprint(arrays: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the four arrays: dtype, shape and bytes of each."""
    digest = hashlib.sha256()
    for key in ARRAYS:
        a = arrays[key]
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.data if a.size else b"")
    return digest.hexdigest()[:16]


def _reader(source: str | Callable) -> tuple[Callable, int | None, str]:
    """A built-in dataset's reader by name, or a user's loader (a callable, or its import path)."""
    if callable(source):
        return source, None, f"{source.__module__}.{source.__qualname__}"
    if isinstance(source, str) and source in DATASETS:
        return (*DATASETS[source], source)
    if isinstance(source, str) and "." in source:
        return locate(source, "data._target_"), None, source
    raise ConfigError(f"unknown dataset '{source}'; valid: {', '.join(sorted(DATASETS))}, or data._target_="
                      "<your loader's import path>")


LOCATION = ("root", "download")  # where a dataset lives: passed to every reader that takes them


def reader_options(reader: Callable) -> list[str]:
    """The options (``data.<key>``) a reader takes besides ``root`` and ``download``."""
    return [n for n, p in inspect.signature(reader).parameters.items()
            if n not in LOCATION and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def load_arrays(source: str | Callable, root: str | os.PathLike | None = None, download: bool = False,
                **options) -> tuple[dict[str, Any], int]:
    """The four arrays of a dataset and its number of classes.

    ``source`` is a built-in name or a user's loader (a class or function, or its import path). Either
    is called with its ``options`` (``data.<key>``: ``path`` for ``tensors``…), and with ``root`` /
    ``download`` if it takes them, and returns the arrays ``x_train, y_train, x_test, y_test`` (numpy
    arrays or tensors; labels integers) as a tuple in that order, a mapping or an object with those
    attributes, optionally with ``num_classes`` (default: the built-in's, else counted from the labels).
    """
    reader, classes, what = _reader(source)
    params = inspect.signature(reader).parameters
    location = {"root": Path(root) if root else default_data_root(), "download": download}
    extra = {k: v for k, v in location.items() if k in params and k not in options}
    kwargs = parse_options(reader, options, "data", f"dataset {what}", provided=tuple(extra))
    try:
        produced = reader(**kwargs, **extra)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a loader failing is one line
        if isinstance(source, str) and source in DATASETS and source != "tensors":
            raise  # a built-in reader's own faults (a missing file, a full disk) keep their type
        raise ConfigError(f"dataset {what} failed: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
    if isinstance(produced, tuple) and len(produced) == len(ARRAYS):
        arrays = dict(zip(ARRAYS, produced))
    else:
        arrays = _arrays_of(produced, what)
        classes = arrays.pop("num_classes", classes)
    arrays = {k: arrays[k] for k in ARRAYS}
    _check_arrays(arrays, what)
    if classes is None:
        labels = [np.asarray(arrays[k].cpu() if isinstance(arrays[k], torch.Tensor) else arrays[k])
                  for k in ("y_train", "y_test")]
        classes = int(max(int(y.max()) for y in labels if y.size)) + 1
    return arrays, int(classes)


def _arrays_of(produced: Any, what: str) -> dict[str, Any]:
    getter = produced.get if isinstance(produced, Mapping) else lambda k, d=None: getattr(produced, k, d)
    missing = [k for k in ARRAYS if getter(k) is None]
    if missing:
        raise ConfigError(f"dataset {what} gave no {missing[0]}; it must give {', '.join(ARRAYS)} "
                          "(a mapping or attributes)")
    out = {k: getter(k) for k in ARRAYS}
    if getter("num_classes") is not None:
        out["num_classes"] = getter("num_classes")
    return out


def _check_arrays(arrays: Mapping[str, Any], what: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        y_np = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
        if len(x) != len(y_np) or y_np.ndim != 1:
            raise ConfigError(f"dataset {what}: x_{split} has {len(x)} examples but y_{split} has shape "
                              f"{tuple(y_np.shape)}; labels must be one integer per example")
        if not len(x):
            raise ConfigError(f"dataset {what}: x_{split} is empty")
        if not np.issubdtype(y_np.dtype, np.integer) or y_np.min() < 0:
            raise ConfigError(f"dataset {what}: y_{split} must hold integer labels 0..C-1, got dtype {y_np.dtype}"
                              f"{'' if not np.issubdtype(y_np.dtype, np.integer) else f' with minimum {y_np.min()}'}")
    if tuple(np.shape(arrays["x_train"])[1:]) != tuple(np.shape(arrays["x_test"])[1:]):
        raise ConfigError(f"dataset {what}: x_train examples have shape {tuple(np.shape(arrays['x_train'])[1:])} "
                          f"but x_test examples {tuple(np.shape(arrays['x_test'])[1:])}")


def load_dataset(
    name: str | Callable,
    root: str | os.PathLike | None = None,
    download: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    augment: Augmentation | None = None,
    **options,
) -> Dataset:
    """Load dataset ``name`` (a built-in name or a user's loader, :func:`load_arrays`) onto ``device``.

    Images (uint8) become float in [0, 1] on the device, then ``(x − mean) / std`` per channel when
    ``mean``/``std`` are given (the constants live in ``conf/data/<name>.yaml``). ``download=True``
    fetches a missing dataset; without it a missing dataset is a :class:`ConfigError` saying where
    lmc looked and how to fetch it. ``augment`` is kept on the dataset for :func:`lmc.core.training.train`.
    """
    arrays, num_classes = load_arrays(name, root, download, **options)
    digest = fingerprint(arrays)

    def prepare(x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device)
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        else:
            x = x.float()
        if mean is not None or std is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            m = torch.as_tensor(list(mean) if mean is not None else [0.0], dtype=x.dtype, device=x.device)
            s = torch.as_tensor(list(std) if std is not None else [1.0], dtype=x.dtype, device=x.device)
            x = (x - m.view(shape)) / s.view(shape)
        return x

    def labels(y) -> torch.Tensor:
        return torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y), dtype=torch.long).to(device)

    label = name if isinstance(name, str) else f"{name.__module__}.{name.__qualname__}"
    return Dataset(label, prepare(arrays["x_train"]), labels(arrays["y_train"]), prepare(arrays["x_test"]),
                   labels(arrays["y_test"]), num_classes, augment=augment, fingerprint=digest)


NOT_LOADER_OPTIONS = ("name", "_target_", "root", "download", "mean", "std", "augment", "crop_padding", "flip",
                      "split", "split_fraction", "split_seed")  # lmc's own data keys; the rest go to the loader


def from_options(options: Mapping, device: torch.device | str = "cpu") -> Dataset:
    """:func:`load_dataset` from a mapping with the keys of a ``data`` config (``name`` or ``_target_``,
    ``root``, ``download``, ``mean``, ``std``, ``augment``, ``crop_padding``, ``flip``, and the loader's
    own keys such as ``path``)."""
    augment = None
    if options.get("augment", False):
        augment = Augmentation(int(options.get("crop_padding", 4)), bool(options.get("flip", True)))
    mean, std = options.get("mean"), options.get("std")
    source = options.get("_target_") or options["name"]
    loader_options = {k: v for k, v in options.items() if k not in NOT_LOADER_OPTIONS}
    return load_dataset(source, options.get("root"), download=bool(options.get("download", False)),
                        mean=None if mean is None else list(mean), std=None if std is None else list(std),
                        device=device, augment=augment, **loader_options)


SPLITS = ("none", "halves", "classes")


def split_pair(data: Dataset, how: str = "none", fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Training data for model A and model B; both keep the full test set.

    - ``none``: both get the whole training set.
    - ``halves``: a random half each (disjoint; permutation seeded by ``seed``).
    - ``classes`` (Git Re-Basin, Fig. 5 / ``_split_cifar``): the training set is shuffled (``seed``) and
      divided by label into the lower classes ``y < C/2`` and the upper classes ``y ≥ C/2``. A gets
      ``1 − fraction`` of the lower-class examples and ``fraction`` of the upper-class ones; B gets the
      rest, i.e. mostly upper classes. The two sets are disjoint and cover the training set
      (Git Re-Basin: fraction 0.2, i.e. 5000 of 25000 on CIFAR-10).
    """
    if how not in SPLITS:
        raise ConfigError(f"unknown data.split '{how}'; valid: {', '.join(SPLITS)}")
    if how == "none":
        return data, data
    if not 0 <= fraction <= 1:
        raise ConfigError(f"data.split_fraction must be in [0, 1], got {fraction}")
    n = len(data.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(data.y_train.device)
    if how == "halves":
        idx_a, idx_b = perm[: n // 2], perm[n // 2 :]
    else:
        lower = data.y_train[perm] < data.num_classes // 2
        lo, hi = perm[lower], perm[~lower]
        k_lo, k_hi = round(fraction * len(lo)), round(fraction * len(hi))
        idx_a = torch.cat([lo[k_lo:], hi[:k_hi]])
        idx_b = torch.cat([hi[k_hi:], lo[:k_lo]])
    return tuple(replace(data, x_train=data.x_train[i], y_train=data.y_train[i]) for i in (idx_a, idx_b))


def download(name: str, root: str | os.PathLike | None = None) -> Path:
    """Fetch dataset ``name`` into ``root`` (MNIST-1D is generated and cached instead; the embedded tables
    are read once, which caches what they are made from); the command line is ``python -m lmc.data download
    NAME`` (:mod:`lmc.data`), where OpenML tables are ``openml:<id>``."""
    check_name(name)
    if name in ("tensors", "table"):
        raise ConfigError(f"dataset '{name}' is read from your own file (data.path); there is nothing to download")
    if name == "openml":
        raise ConfigError("dataset 'openml' is one table per id: download it by `python -m lmc.data download "
                          "openml:<id>` (openml:grinsztajn: the 16 of Grinsztajn et al.'s benchmark)")
    root = Path(root) if root else default_data_root()
    root.mkdir(parents=True, exist_ok=True)
    reader = DATASETS[name][0]
    reader(root, download=True) if "download" in inspect.signature(reader).parameters else reader(root)
    return root
