"""Soft tree ensembles through the pipeline (issue 19, phase 2): the declared symmetry in the alignment stage
(the trust check), the pair study with model=soft_trees, study=trees end to end, and bad inputs."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import lmc_run
from torch import nn

from lmc.config import settings_from_config
from lmc.core.barriers import barrier, curve
from lmc.core.models import SoftTreeEnsemble
from lmc.core.permutation.declared import declares_symmetry, relative_output_difference
from lmc.core.permutation.trees import TreeSymmetry, TreeTransform
from lmc.core.training import seeded_init
from lmc.errors import ConfigError
from lmc.errors import WrongSymmetry as WrongSymmetryError
from lmc.io import read_curves
from lmc.run import CONF_DIR, run
from lmc.stages.alignment import apply_alignment, declared_alignment
from lmc.stages.store import Store
from lmc.studies import load_study

QUICK = ["logger=none", "progress=false", "train.epochs=2", "interp.num_alphas=3"]


def results_of(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def check_only(overrides):
    """Compose, parse and run the study's checks (no data, no training)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    settings = settings_from_config(cfg, overrides)
    study, options = load_study(settings.study)
    study.check(settings, options)


# ------------------------------------------------------------------------------ the trust check, by hand

def test_relative_output_difference_known_answers():
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    sd = model.state_dict()
    x = torch.tensor([[1.0, 1.0, 5.0]])  # outputs (1, 2)
    assert relative_output_difference(model, sd, sd, x) == 0.0
    assert relative_output_difference(model, sd, {"weight": 2 * sd["weight"]}, x) == pytest.approx(1.0)
    swapped = {"weight": sd["weight"].flip(0)}  # outputs (2, 1): ‖(1, −1)‖ / ‖(1, 2)‖
    assert relative_output_difference(model, sd, swapped, x) == pytest.approx(2 ** 0.5 / 5 ** 0.5)


class _Data:
    def __init__(self, x):
        self.x_train = x


class WrongSymmetry(TreeSymmetry):
    """Declares tree flips but forgets to negate the flipped node's (w, b): a wrong declaration."""

    def apply(self, element, state_dict):
        out = super().apply(element, state_dict)
        sign = 1.0 - 2.0 * element.flips.double()
        out["split_bias"] = out["split_bias"] * sign.to(out["split_bias"])  # undoes the bias negation
        return out


def _pair(kind="perfect", depth=2, trees=6):
    build = lambda: SoftTreeEnsemble((5,), 3, trees=trees, depth=depth, kind=kind)  # noqa: E731
    return seeded_init(build, 0).eval(), seeded_init(build, 1).eval()


def test_declared_alignment_is_stored_checked_and_recovers_a_transformed_copy(tmp_path):
    model_a, _ = _pair("oblivious", 3)
    sym = model_a.symmetry()
    element = sym.random(7)
    model_b = SoftTreeEnsemble((5,), 3, trees=6, depth=3, kind="oblivious")
    model_b.load_state_dict(sym.apply(element, model_a.state_dict()))
    data = _Data(torch.randn(64, 5, generator=torch.Generator().manual_seed(0)))
    store = Store(tmp_path / "store")
    options = {"invariances": ["perm", "flip", "order"]}
    first = declared_alignment(store, sym, "weight_matching", options, model_a, model_b, ("a", "b"), data)
    assert isinstance(first.perm, TreeTransform) and not first.reused
    aligned = apply_alignment(sym, first.perm, model_b.state_dict())
    assert all(torch.allclose(aligned[k], v, atol=1e-6) for k, v in model_a.state_dict().items())  # A back
    assert first.diagnostics["l2_after"] < 1e-5 < first.diagnostics["l2_before"]
    assert first.diagnostics["output_difference"] <= 1e-6
    again = declared_alignment(store, sym, "weight_matching", options, model_a, model_b, ("a", "b"), data)
    assert again.reused and again.hash == first.hash and torch.equal(again.perm.perm, first.perm.perm)
    # fewer invariances: another store entry, and not a perfect recovery
    perm_only = declared_alignment(store, sym, "weight_matching", {"invariances": ["perm"]}, model_a, model_b,
                                   ("a", "b"), data)
    assert perm_only.hash != first.hash and perm_only.diagnostics["l2_after"] > 1e-3


def test_a_wrong_declared_symmetry_stops_the_run_naming_the_model(tmp_path):
    model_a, model_b = _pair()
    wrong = WrongSymmetry(model_a.shape, model_a.trees)
    data = _Data(torch.randn(64, 5, generator=torch.Generator().manual_seed(0)) * 3)
    with pytest.raises(WrongSymmetryError) as info:
        declared_alignment(Store(tmp_path), wrong, "weight_matching", {"invariances": ["perm", "flip"]}, model_a,
                           model_b, ("a", "b"), data)
    message = str(info.value)
    assert "\n" not in message and "lmc.core.models.trees.SoftTreeEnsemble" in message
    assert "relative output difference" in message and "> 0.0001" in message


def test_declares_symmetry():
    assert declares_symmetry(SoftTreeEnsemble) and declares_symmetry(_pair()[0])
    assert not declares_symmetry(nn.Linear(2, 2))


# ------------------------------------------------------------------------------- the pair study, end to end

def test_pair_study_with_soft_trees_end_to_end(tmp_path, data_root):
    store = tmp_path / "store"
    args = ["model=soft_trees", "model.trees=8", "data=digits", *QUICK, f"store.root={store}"]
    proc = lmc_run([*args, f"hydra.run.dir={tmp_path / 'wm'}"], tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_of(tmp_path / "wm")
    assert set(results["barriers"]) == {"naive", "weight_matching"}
    diag = results["diagnostics"]["weight_matching"]
    assert diag["invariances"] == ["perm", "flip"] and diag["output_difference"] <= 1e-4
    assert diag["l2_after"] < diag["l2_before"]
    assert set(results["layerwise"]["weight_matching"]) == {"splits", "leaves"}
    stored = torch.load(store / "alignments" / results["store"]["hashes"]["align"] / "perm.pt", weights_only=True)
    assert set(stored["perm"]) == {"perm", "flips", "order"} and stored["perm"]["flips"].shape == (8, 3)
    # activation matching and no alignment reuse the stored models
    for method in ("activation_matching", "none"):
        overrides = [*args, f"data.root={data_root}", f"align={method}"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        again = run(cfg, tmp_path / method, overrides)
        assert again["reused"]["a"] and again["reused"]["b"]
        assert set(again["barriers"]) == {"naive"} | ({method} - {"none"})
        if method == "activation_matching":
            assert again["diagnostics"][method]["output_difference"] <= 1e-4


# --------------------------------------------------------------------------- study=trees, end to end

@pytest.fixture(scope="module")
def trees_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("trees")
    args = ["experiment=trees", "model.kind=oblivious", "model.trees=8", "data=breast_cancer", "seeds=[0,1,2,3]",
            "study.learning_rates=[0.01,0.001]", "study.samples=64", *QUICK, f"store.root={tmp / 'store'}"]
    proc = lmc_run([*args, f"hydra.run.dir={tmp / 'out'}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, args, proc


def test_trees_study_tables(trees_run):
    tmp, _, proc = trees_run
    results = results_of(tmp / "out")
    assert results["study"] == "trees" and results["seeds"] == [0, 1, 2, 3]
    assert results["pairs"] == [[0, 1], [2, 3]]
    rate = results["learning_rate"]
    assert set(rate["train_acc"]) == {"0.01", "0.001"} and f"{rate['chosen']:g}" in rate["train_acc"]
    assert rate["train_acc"][f"{rate['chosen']:g}"] == max(rate["train_acc"].values())
    hashes = results["store"]["hashes"]
    assert hashes["model/0"] == hashes[f"lr/{rate['chosen']:g}"]  # the probe at the chosen rate is model 0
    assert len({hashes[f"model/{s}"] for s in range(4)}) == 4
    assert list(results["barriers"]) == ["naive", "perm", "perm+flip", "perm+flip+order", "activation"]
    assert results["symmetry"] == {"kind": "declared", "invariances": ["perm", "flip", "order"]}
    for per_split in results["barriers"].values():
        for split in ("train", "test"):
            entry = per_split[split]
            assert len(entry["error_per_pair"]) == 2
            assert entry["error"] == pytest.approx(np.mean(entry["error_per_pair"]))
            assert entry["error_std"] == pytest.approx(np.std(entry["error_per_pair"]))
    assert [d["invariances"] for d in results["diagnostics"]["perm+flip"]] == [["perm", "flip"]] * 2
    assert all(d["output_difference"] <= 1e-4 for v in results["diagnostics"].values() for d in v)
    assert "accuracy barrier (percentage points" in proc.stdout


def test_trees_study_barriers_are_the_papers_eq1_from_the_curves(trees_run):
    tmp, _, _ = trees_run
    results, rows = results_of(tmp / "out"), read_curves(tmp / "out")
    assert {r["pair"] for r in rows} == {"0", "1"} and {r["method"] for r in rows} == set(results["barriers"])
    for k in (0, 1):
        c = curve([r for r in rows if r["pair"] == str(k)], "perm+flip", "test")
        assert len(c["alpha"]) == 3
        # Eq. 1: max over λ of the line between the endpoints' accuracies minus the accuracy on the path
        eq1 = max((1 - a) * c["acc"][0] + a * c["acc"][-1] - acc for a, acc in zip(c["alpha"], c["acc"]))
        assert results["barriers"]["perm+flip"]["test"]["error_per_pair"][k] == pytest.approx(eq1)
        assert eq1 == pytest.approx(barrier(c["alpha"], c["error"]))


def test_trees_study_figures_redraw_and_a_second_run_reuses_everything(trees_run, data_root):
    tmp, args, _ = trees_run
    for name in ("barriers.png", "curves.png"):
        (tmp / "out" / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(tmp / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "out" / "barriers.png").is_file() and (tmp / "out" / "curves.png").is_file()
    proc = lmc_run([*args, f"hydra.run.dir={tmp / 'again'}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = results_of(tmp / "again")
    assert all(again["reused"].values()) and again["barriers"] == results_of(tmp / "out")["barriers"]


def test_trees_study_with_a_traced_model(tmp_path, data_root):
    """The paper's MLP row: naive, weight matching and activation matching of its traced spec."""
    args = ["experiment=trees", "model=mlp", "model.width=16", "model.depth=2", "data=breast_cancer", "seeds=[0,1]",
            "study.learning_rates=[0.01]", *QUICK, f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path}/o"]
    proc = lmc_run(args, tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_of(tmp_path / "o")
    assert list(results["barriers"]) == ["naive", "perm", "activation"]
    assert results["symmetry"] == {"kind": "traced", "invariances": ["perm"]}


# ------------------------------------------------------------------------------------------ bad inputs

def _table(path, **extra):
    pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.5, 0.1, 0.2, 0.3], "label": ["x", "y", "x", "y"], **extra}) \
        .to_csv(path, index=False)
    return path


@pytest.mark.parametrize("args,message", [
    (["data=openml", "data.id=123456"], "OpenML dataset 123456 is not under"),
    (["data=table", "data.path=t.csv", "data.target=outcome"],
     "data.target 'outcome' is not a column of t.csv; columns: a, b, label"),
    (["data=table", "data.path=city.csv", "data.target=label"], "column 'city' of city.csv is not numeric"),
    (["model=soft_trees", "model.trees=4", "align=ste"],
     "align.method=ste needs a traced permutation spec, but model soft_trees declares its own symmetry; valid: "
     "weight_matching, activation_matching, none"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    _table(tmp_path / "t.csv")
    _table(tmp_path / "city.csv", city=["p", "q", "p", "r"])
    store = tmp_path / "store"
    proc = lmc_run([*args, *QUICK, f"store.root={store}", f"hydra.run.dir={tmp_path / 'o'}"], tmp_path,
                   tmp_path / "empty_data")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not store.exists()


@pytest.mark.parametrize("overrides,message", [
    (["data=openml"], "data=openml needs data.id=<OpenML dataset id>"),
    (["data=table", "data.target=y"], "data=table needs data.path=<a CSV or Parquet file>"),
    (["data=digits", "data.quantile=maybe"], "data.quantile must be true or false, got 'maybe'"),
    (["model=soft_trees", "model.kind=forest"],
     "unknown model.kind 'forest'; valid: perfect, oblivious, decision_list, modified_decision_list"),
    (["model=soft_trees", "align=sinkhorn"], "align.method=sinkhorn needs a traced permutation spec"),
    (["model=soft_trees", "seeds=[0,1,2]", "align.merge=merge_many"], "align.merge=merge_many needs a traced"),
    (["model=soft_trees", "align._target_=lmc.core.alignment.STE"], "align.method=ste needs a traced"),
    (["experiment=trees", "seeds=[0,1,2]"], "study=trees pairs the seeds in order, so it needs an even number"),
    (["experiment=trees", "seeds=[0,1,1,2]"], "distinct integers"),
    (["experiment=trees", "study.learning_rates=[0.1,0.1]"], "study.learning_rates must be distinct positive"),
    (["experiment=trees", "study.learning_rates=[-0.1]"], "study.learning_rates[0] must be a positive number"),
    (["experiment=trees", "study.samples=0"], "study.samples must be a positive integer, got 0"),
    (["experiment=trees", "data.split=halves"], "study=trees trains every model on the whole training set"),
])
def test_bad_settings_are_one_line_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError) as info:
        check_only(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
