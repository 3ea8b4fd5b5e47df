"""Tabular data: OpenML tables stored once and read offline, CSV/Parquet tables, the embedded tables,
the seeded split and the quantile transform fitted on the training rows; bad inputs in one line."""

import types
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch

import lmc.core.data.tabular as tabular
from lmc.core.data import load_dataset
from lmc.core.data.tabular import (
    GRINSZTAJN_CLASSIFICATION,
    download_openml,
    embedded_table,
    load_table,
    openml_ids,
    openml_path,
    quantile_transform,
    read_openml,
    split_indices,
)
from lmc.data import main as data_cli
from lmc.errors import ConfigError


def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def frame():
    """Six rows: two numeric features and a string label."""
    return pd.DataFrame({"age": [30, 41, 25, 60, 33, 47], "score": [0.5, 1.5, -2.0, 3.25, 0.0, 1.0],
                         "label": ["yes", "no", "yes", "maybe", "no", "yes"]})


# --- OpenML ------------------------------------------------------------------------------------------------

def test_read_openml_reads_the_stored_file(tmp_path):
    """The file format download_openml writes, fabricated by hand."""
    path = tmp_path / "openml" / "4242.npz"
    path.parent.mkdir()
    np.savez_compressed(path, x=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32),
                        y=np.array([1, 0, 1]), feature_names=np.array(["a", "b"]), classes=np.array(["neg", "pos"]),
                        name=np.array("fake"), openml_id=np.array(4242))
    table = read_openml(4242, tmp_path)
    assert table.name == "fake" and table.num_classes == 2
    assert table.feature_names == ("a", "b") and table.classes == ("neg", "pos")
    assert table.x.tolist() == [[1, 2], [3, 4], [5, 6]] and table.y.tolist() == [1, 0, 1]


def test_download_openml_stores_once_and_runs_read_only_the_file(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(dataset_id, data_home):
        calls.append((dataset_id, data_home))
        data = frame()
        return types.SimpleNamespace(data=data.drop(columns="label"), target=data["label"].astype("category"),
                                     details={"name": "toy"})

    monkeypatch.setattr(tabular, "_fetch_openml", fake_fetch)
    path = download_openml(77, tmp_path)
    assert path == openml_path(77, tmp_path) == tmp_path / "openml" / "77.npz"
    assert calls == [(77, tmp_path / "openml" / "cache")]
    assert download_openml(77, tmp_path) == path and len(calls) == 1  # stored once
    table = read_openml(77, tmp_path)
    assert table.name == "toy" and table.classes == ("maybe", "no", "yes")
    assert table.y.tolist() == [2, 1, 2, 0, 1, 2]
    assert table.x[:, 1].tolist() == [0.5, 1.5, -2.0, 3.25, 0.0, 1.0]
    assert not list((tmp_path / "openml").glob("*.tmp*"))  # written atomically


def test_download_command_fetches_openml_ids(tmp_path, monkeypatch, capsys):
    fetched = []

    def fake_fetch(dataset_id, data_home):
        fetched.append(dataset_id)
        data = frame()
        return types.SimpleNamespace(data=data.drop(columns="label"), target=data["label"], details={"name": "t"})

    monkeypatch.setattr(tabular, "_fetch_openml", fake_fetch)
    assert data_cli(["download", "openml:5", "openml:6", "--root", str(tmp_path)]) == 0
    assert fetched == [5, 6] and (tmp_path / "openml" / "6.npz").is_file()
    assert "openml:5: ready as" in capsys.readouterr().out


def test_download_offline_is_one_line_naming_the_id(tmp_path, monkeypatch, capsys):
    def offline(dataset_id, data_home):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tabular, "_fetch_openml", offline)
    assert data_cli(["download", "openml:44120", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "OpenML dataset 44120" in err and "name resolution" in err
    assert not (tmp_path / "openml" / "44120.npz").exists()


def test_unknown_openml_id_offline_names_the_id_and_the_command(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_dataset("openml", tmp_path, id=123456)
    message = one_line(err)
    assert "OpenML dataset 123456" in message
    assert f"python -m lmc.data download openml:123456 --root {tmp_path}" in message


def test_openml_ids_and_the_papers_preset():
    assert openml_ids("openml:44120") == [44120]
    assert openml_ids("openml:grinsztajn") == list(GRINSZTAJN_CLASSIFICATION)
    assert len(GRINSZTAJN_CLASSIFICATION) == 16 and GRINSZTAJN_CLASSIFICATION[44128] == "MiniBooNE"
    with pytest.raises(ConfigError, match="bad OpenML dataset 'openml:higgs'") as err:
        openml_ids("openml:higgs")
    one_line(err)


# --- CSV / Parquet -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_files_load_with_their_target_column(tmp_path, suffix):
    path = tmp_path / f"people{suffix}"
    data = frame()
    data.to_csv(path, index=False) if suffix == ".csv" else data.to_parquet(path)
    table = load_table(path, "label")
    assert table.name == "people" and table.feature_names == ("age", "score")
    assert table.classes == ("maybe", "no", "yes") and table.y.tolist() == [2, 1, 2, 0, 1, 2]
    assert table.x.dtype == np.float32 and table.x[:, 0].tolist() == [30, 41, 25, 60, 33, 47]
    data_split = load_dataset("table", path=str(path), target="label", train_size=4, test_size=2, quantile=False)
    assert len(data_split.y_train) == 4 and len(data_split.y_test) == 2 and data_split.num_classes == 3


def test_missing_target_column_names_it_and_the_columns(tmp_path):
    path = tmp_path / "t.csv"
    frame().to_csv(path, index=False)
    with pytest.raises(ConfigError) as err:
        load_table(path, "outcome")
    assert one_line(err) == f"data.target 'outcome' is not a column of {path}; columns: age, score, label"


def test_non_numeric_feature_names_the_column(tmp_path):
    path = tmp_path / "t.parquet"
    frame().assign(city=["a", "b", "a", "c", "b", "a"]).to_parquet(path)
    with pytest.raises(ConfigError) as err:
        load_table(path, "label")
    assert one_line(err).startswith(f"column 'city' of {path} is not numeric")


@pytest.mark.parametrize("change,message", [
    (lambda f: f.assign(score=[0.5, None, 1.0, 2.0, 3.0, 4.0]), "column 'score' of .* has 1 missing values"),
    (lambda f: f.assign(label=[0.5, 1.5, 2.0, 3.0, 1.0, 0.0]), "non-integer values"),
])
def test_missing_values_and_regression_targets_are_one_line(tmp_path, change, message):
    path = tmp_path / "t.csv"
    change(frame()).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=message) as err:
        load_table(path, "label")
    one_line(err)


def test_bad_table_paths_and_names(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_table(tmp_path / "absent.csv", "y")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="neither CSV"):
        load_table(tmp_path / "t.xlsx", "y")
    with pytest.raises(ConfigError, match="needs data.path"):
        load_dataset("table")
    with pytest.raises(ConfigError, match="unknown tabular dataset 'iris'") as err:
        embedded_table("iris")
    one_line(err)


# --- embedded tables, split, quantile transform ----------------------------------------------------------------

def test_embedded_tables_ship_offline(data_root):
    digits = embedded_table("digits")
    assert digits.x.shape == (1797, 64) and digits.num_classes == 10
    cancer = embedded_table("breast_cancer")
    assert cancer.x.shape == (569, 30) and cancer.classes == ("malignant", "benign")
    mnist = embedded_table("mnist1d_tabular", data_root)
    assert mnist.x.shape == (5000, 40) and mnist.num_classes == 10


def test_split_sizes_follow_the_paper_or_its_proportions():
    train, test = split_indices(25_000, seed=3)
    assert len(train) == len(test) == 10_000 and not set(train) & set(test)
    train, test = split_indices(1797)  # fewer rows than 20,000: half and half
    assert (len(train), len(test)) == (898, 899) and len(set(train) | set(test)) == 1797
    assert np.array_equal(split_indices(100, 30, 20, seed=1)[0], split_indices(100, 30, 20, seed=1)[0])
    assert not np.array_equal(split_indices(100, 30, 20, seed=1)[0], split_indices(100, 30, 20, seed=2)[0])
    with pytest.raises(ConfigError, match="must be positive"):
        split_indices(10, 0, 5)


def test_quantile_transform_is_fitted_on_the_training_rows_only():
    rng = np.random.default_rng(0)
    x_train = rng.uniform(0, 1, size=(2000, 2)).astype(np.float32)
    x_test = np.array([[0.5, 0.5], [2.0, -1.0]], dtype=np.float32)
    train, test = quantile_transform(x_train, x_test)
    assert abs(train.mean()) < 0.05 and abs(train.std() - 1) < 0.1  # normal on the training rows
    assert abs(test[0]).max() < 0.1  # the training median maps to 0
    assert test[1, 0] > 5 and test[1, 1] < -5  # beyond the training range: clipped to the extreme quantiles
    # fitting on all rows would move the test rows' values: the test rows are not used
    _, test_again = quantile_transform(x_train, np.concatenate([x_test, 10 + x_test]))
    assert np.array_equal(test_again[:2], test)


def test_tabular_dataset_splits_and_transforms():
    data = load_dataset("breast_cancer", sample_seed=4)
    assert data.input_shape == (30,) and data.num_classes == 2
    assert (len(data.y_train), len(data.y_test)) == (284, 285)
    assert data.x_train.dtype == torch.float32
    # about standard normal: the extreme training rows map to ±5.2 and ties share a quantile, so not exactly
    assert float(data.x_train.mean(0).abs().max()) < 0.1 and float((data.x_train.std(0) - 1).abs().max()) < 0.35
    raw = load_dataset("breast_cancer", sample_seed=4, quantile=False)
    assert torch.equal(raw.y_train, data.y_train)  # the same rows, transformed or not
    order = raw.x_train.argsort(0)
    assert bool((data.x_train.gather(0, order).diff(dim=0) >= 0).all())  # monotone in each feature
    digits = load_dataset("digits", sample_seed=4)
    assert (len(digits.y_train), len(digits.y_test)) == (898, 899) and digits.num_classes == 10
