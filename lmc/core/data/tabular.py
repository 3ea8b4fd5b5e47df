"""Tabular classification data: OpenML datasets fetched once, the user's CSV/Parquet tables, and
embedded tables; a seeded train/test split and the quantile transform, fitted on the training split.

Sources, each giving a :class:`Table` (numeric features, integer class codes):

* **OpenML** (:func:`download_openml`, :func:`read_openml`): ``sklearn.datasets.fetch_openml`` by id,
  run once by ``python -m lmc.data download openml:<id> [--root DIR]``, which stores the table as
  ``<root>/openml/<id>.npz``; runs read only that file and never touch the network.
  :data:`GRINSZTAJN_CLASSIFICATION` lists the 16 datasets of Grinsztajn et al.'s benchmark that
  Kanoh & Sugiyama (ICLR 2025) use (``openml:grinsztajn`` downloads them all);
* **a table of the user's** (:func:`load_table`): a CSV or Parquet file and the name of its target column;
* **embedded** (:func:`embedded_table`): ``digits`` and ``breast_cancer``, which ship inside
  scikit-learn (no download), and ``mnist1d_tabular``, MNIST-1D's 40 features as a table.

:func:`tabular_arrays` turns a table into a dataset's four arrays: a seeded split (the paper's 10,000
training and 10,000 test rows where the table has them, the same proportions of a smaller one), then
each feature mapped to a standard normal distribution by scikit-learn's ``QuantileTransformer`` fitted
on the training rows only (Grinsztajn et al.'s preprocessing). The readers :func:`read_embedded`,
:func:`read_openml_dataset` and :func:`read_table_file` are the built-in datasets ``data=digits``,
``breast_cancer``, ``mnist1d_tabular``, ``openml`` (``data.id``) and ``table`` (``data.path``,
``data.target``) of :data:`lmc.core.data.DATASETS`; their keyword options are ``data.<key>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmc.errors import ConfigError
from lmc.settings import NonNegativeInt, PositiveInt

# lmc.core.data imports this module to register its readers: what it needs from there is imported late

__all__ = ["EMBEDDED_TABLES", "GRINSZTAJN_CLASSIFICATION", "Table", "download_openml", "embedded_table",
           "load_table", "openml_ids", "openml_path", "quantile_transform", "read_embedded", "read_openml",
           "read_openml_dataset", "read_table_file", "split_indices", "tabular_arrays"]

# The 16 classification datasets with numerical features of Grinsztajn, Oyallon & Varoquaux, "Why do
# tree-based models still outperform deep learning on tabular data?" (NeurIPS 2022 Datasets and
# Benchmarks; OpenML suite 337, "classification on numerical features"), which Kanoh & Sugiyama
# (ICLR 2025) use for their tables. OpenML dataset id -> name. The ids 44089 ... 44130 are the ones a
# public benchopt OpenML dataset list gives for these names; the six ids 45019 ... 45028 are the
# benchmark's later uploads (Bioresponse, default-of-credit-card-clients, jannis, Diabetes130US, heloc,
# california) as recalled, not checked against OpenML: confirm them with
# ``openml.study.get_suite(337).data`` once online.
GRINSZTAJN_CLASSIFICATION: dict[int, str] = {
    44089: "credit",
    44120: "electricity",
    44121: "covertype",
    44122: "pol",
    44123: "house_16H",
    44125: "MagicTelescope",
    44126: "bank-marketing",
    44128: "MiniBooNE",
    44129: "Higgs",
    44130: "eye_movements",
    45019: "Bioresponse",
    45020: "default-of-credit-card-clients",
    45021: "jannis",
    45022: "Diabetes130US",
    45026: "heloc",
    45028: "california",
}
GRINSZTAJN_PRESET = "grinsztajn"  # openml:grinsztajn names all of them

EMBEDDED_TABLES = ("digits", "breast_cancer", "mnist1d_tabular")
TRAIN_SIZE = TEST_SIZE = 10_000  # the paper's split sizes
QUANTILES = 1000  # QuantileTransformer's default number of quantiles (fewer if the training split is smaller)


@dataclass
class Table:
    """A classification table: ``x`` ``(n, F)`` float32 features, ``y`` ``(n,)`` int64 class codes
    ``0..C−1`` (``classes[c]`` is code ``c``'s original label)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _from_frame(frame, target, what: str) -> Table:
    """A :class:`Table` from a pandas DataFrame of features and a Series of labels; ``what`` names the
    source in error messages."""
    import pandas as pd

    for column in frame.columns:
        dtype = frame[column].dtype
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            raise ConfigError(f"column '{column}' of {what} is not numeric (dtype {dtype}); the tabular loader "
                              "takes numeric features only: encode or drop it")
    x = frame.to_numpy(dtype=np.float64)
    missing = np.isnan(x).sum(0)
    if missing.any():
        column = frame.columns[int(np.argmax(missing > 0))]
        raise ConfigError(f"column '{column}' of {what} has {int(missing.max())} missing values; "
                          "impute or drop them first")
    target = pd.Series(target)
    if target.isna().any():
        raise ConfigError(f"the target of {what} has {int(target.isna().sum())} missing values")
    values = target.to_numpy()
    if pd.api.types.is_float_dtype(target.dtype) and not np.all(np.mod(values, 1) == 0):
        raise ConfigError(f"the target of {what} has non-integer values (a regression target?); "
                          "tabular datasets here are classification")
    if not pd.api.types.is_numeric_dtype(target.dtype):
        values = values.astype(str)
    classes, codes = np.unique(values, return_inverse=True)
    return Table(what, x.astype(np.float32), codes.astype(np.int64).reshape(-1),
                 tuple(str(c) for c in frame.columns), tuple(str(c) for c in classes))


# --- OpenML -----------------------------------------------------------------------------------------

def openml_path(dataset_id: int, root: str | os.PathLike | None = None) -> Path:
    from lmc.core.data import default_data_root

    return Path(root if root is not None else default_data_root()) / "openml" / f"{int(dataset_id)}.npz"


def openml_ids(spec: str) -> list[int]:
    """``openml:<id>`` → ``[id]``; ``openml:grinsztajn`` → the 16 ids of :data:`GRINSZTAJN_CLASSIFICATION`."""
    value = spec.removeprefix("openml:")
    if value == GRINSZTAJN_PRESET:
        return list(GRINSZTAJN_CLASSIFICATION)
    if not value.isdigit():
        raise ConfigError(f"bad OpenML dataset '{spec}'; valid: openml:<integer id> or openml:{GRINSZTAJN_PRESET}")
    return [int(value)]


def _fetch_openml(dataset_id: int, data_home: Path):
    """scikit-learn's ``fetch_openml`` (the network call; tests replace it). Its warnings on each retry
    are silenced: a failure ends in one line (:func:`download_openml`)."""
    import warnings

    from sklearn.datasets import fetch_openml

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A network error occurred", category=UserWarning)
        return fetch_openml(data_id=dataset_id, as_frame=True, data_home=str(data_home), parser="auto")


def download_openml(dataset_id: int, root: str | os.PathLike | None = None) -> Path:
    """Fetch OpenML dataset ``dataset_id`` and store it as ``<root>/openml/<id>.npz`` (written
    atomically; an existing file is kept). Returns the file's path."""
    path = openml_path(dataset_id, root)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        bunch = _fetch_openml(int(dataset_id), path.parent / "cache")
    except Exception as exc:  # noqa: BLE001 - no network, an unknown id, a server error: one line for the user
        raise ConfigError(f"could not fetch OpenML dataset {dataset_id}: {type(exc).__name__}: {exc}"
                          .replace("\n", " ")) from exc
    name = str(getattr(bunch, "details", {}).get("name", dataset_id))
    table = _from_frame(bunch.data, bunch.target, f"OpenML dataset {dataset_id} ({name})")
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, x=table.x, y=table.y, feature_names=np.array(table.feature_names),
                        classes=np.array(table.classes), name=np.array(name), openml_id=np.array(int(dataset_id)))
    os.replace(tmp, path)
    return path


def read_openml(dataset_id: int, root: str | os.PathLike | None = None) -> Table:
    """The stored OpenML dataset ``dataset_id`` (see :func:`download_openml`); never downloads."""
    path = openml_path(dataset_id, root)
    if not path.exists():
        raise ConfigError(f"OpenML dataset {dataset_id} is not under {path.parent} (runs read only the stored "
                          f"file); fetch it once with `python -m lmc.data download openml:{dataset_id} "
                          f"--root {path.parent.parent}`")
    try:
        with np.load(path) as f:
            return Table(str(f["name"]), f["x"].astype(np.float32), f["y"].astype(np.int64),
                         tuple(str(s) for s in f["feature_names"]), tuple(str(s) for s in f["classes"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable OpenML table ({type(exc).__name__}: {exc}); delete it and "
                          f"fetch it again with `python -m lmc.data download openml:{dataset_id}`") from exc


# --- the user's tables --------------------------------------------------------------------------------

def load_table(path: str | os.PathLike, target: str) -> Table:
    """A CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file; ``target`` names the label
    column, every other column is a numeric feature."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path {path} is not a file")
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        frame = pd.read_parquet(path)
    elif suffixes.endswith((".csv", ".csv.gz")):
        frame = pd.read_csv(path)
    else:
        raise ConfigError(f"data.path {path} is neither CSV (.csv, .csv.gz) nor Parquet (.parquet, .pq)")
    if target not in frame.columns:
        raise ConfigError(f"data.target '{target}' is not a column of {path}; columns: "
                          f"{', '.join(map(str, frame.columns))}")
    table = _from_frame(frame.drop(columns=[target]), frame[target], str(path))
    table.name = path.name.split(".")[0]
    return table


# --- embedded tables ----------------------------------------------------------------------------------

def embedded_table(name: str, root: str | os.PathLike | None = None) -> Table:
    """``digits`` (1,797 rows × 64 pixel counts, 10 classes) and ``breast_cancer`` (569 × 30, 2 classes),
    shipped inside scikit-learn; ``mnist1d_tabular``: MNIST-1D's 5,000 sequences (its training and test
    sets together) as rows of 40 features, 10 classes (generated and cached under ``root``)."""
    if name == "mnist1d_tabular":
        from lmc.core.data import load_dataset

        data = load_dataset("mnist1d", root)
        x = np.concatenate([data.x_train.flatten(1).numpy(), data.x_test.flatten(1).numpy()])
        y = np.concatenate([data.y_train.numpy(), data.y_test.numpy()])
        return Table(name, x.astype(np.float32), y.astype(np.int64), tuple(f"x{i}" for i in range(x.shape[1])),
                     tuple(str(c) for c in range(10)))
    if name not in ("digits", "breast_cancer"):
        raise ConfigError(f"unknown tabular dataset '{name}'; valid: {', '.join(EMBEDDED_TABLES)}")
    from sklearn import datasets

    bunch = datasets.load_digits() if name == "digits" else datasets.load_breast_cancer()
    return Table(name, bunch.data.astype(np.float32), bunch.target.astype(np.int64),
                 tuple(map(str, bunch.feature_names)), tuple(map(str, bunch.target_names)))


# --- split and transform ------------------------------------------------------------------------------

def split_indices(n: int, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random training and test rows of a table of ``n`` rows: ``train_size`` and ``test_size``
    of them where there are enough, else all ``n`` rows in the same proportions."""
    if train_size < 1 or test_size < 1:
        raise ConfigError(f"data.train_size and data.test_size must be positive, got {train_size}, {test_size}")
    if train_size + test_size > n:
        train_size = round(n * train_size / (train_size + test_size))
        test_size = n - train_size
        if train_size < 1 or test_size < 1:
            raise ConfigError(f"a table of {n} rows cannot be split into training and test rows")
    order = np.random.default_rng(seed).permutation(n)
    return order[:train_size], order[train_size : train_size + test_size]


def quantile_transform(x_train: np.ndarray, x_test: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each feature mapped to a standard normal distribution by a ``QuantileTransformer`` fitted on
    ``x_train`` alone (so nothing of the test rows leaks into the features)."""
    from sklearn.preprocessing import QuantileTransformer

    transform = QuantileTransformer(n_quantiles=min(QUANTILES, len(x_train)), output_distribution="normal",
                                    random_state=seed)
    train = transform.fit_transform(x_train)
    return train.astype(np.float32), transform.transform(x_test).astype(np.float32)


def tabular_arrays(table: Table, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE, seed: int = 0,
                   quantile: bool = True) -> dict:
    """A dataset's arrays from ``table``: split by :func:`split_indices` (``seed``), then, if ``quantile``,
    :func:`quantile_transform` fitted on the training rows; and the table's number of classes (a class
    absent from both splits still counts)."""
    train, test = split_indices(len(table.y), train_size, test_size, seed)
    x_train, x_test = table.x[train], table.x[test]
    if quantile:
        x_train, x_test = quantile_transform(x_train, x_test, seed)
    return {"x_train": np.ascontiguousarray(x_train, dtype=np.float32), "y_train": table.y[train],
            "x_test": np.ascontiguousarray(x_test, dtype=np.float32), "y_test": table.y[test],
            "num_classes": table.num_classes}


# --- the built-in datasets' readers (lmc.core.data.DATASETS): their keyword options are data.<key> -----------

def read_embedded(name: str) -> Callable[..., dict]:
    """The reader of embedded table ``name`` (:data:`EMBEDDED_TABLES`)."""

    def read(root: Path, train_size: PositiveInt = TRAIN_SIZE, test_size: PositiveInt = TEST_SIZE,
             sample_seed: NonNegativeInt = 0, quantile: bool = True) -> dict:
        return tabular_arrays(embedded_table(name, root), train_size, test_size, sample_seed, quantile)

    return read


def read_openml_dataset(root: Path, id: PositiveInt | None = None, train_size: PositiveInt = TRAIN_SIZE,
                        test_size: PositiveInt = TEST_SIZE, sample_seed: NonNegativeInt = 0,
                        quantile: bool = True) -> dict:
    """``data=openml data.id=<id>``: the OpenML table stored under ``root`` (:func:`read_openml`)."""
    if id is None:
        raise ConfigError("data=openml needs data.id=<OpenML dataset id>")
    return tabular_arrays(read_openml(id, root), train_size, test_size, sample_seed, quantile)


def read_table_file(path: str | None = None, target: str | None = None, train_size: PositiveInt = TRAIN_SIZE,
                    test_size: PositiveInt = TEST_SIZE, sample_seed: NonNegativeInt = 0, quantile: bool = True) -> dict:
    """``data=table data.path=<file> data.target=<column>``: a CSV or Parquet table (:func:`load_table`)."""
    if path is None or target is None:
        raise ConfigError("data=table needs data.path (a CSV or Parquet file) and data.target (its label column)")
    return tabular_arrays(load_table(path, target), train_size, test_size, sample_seed, quantile)
