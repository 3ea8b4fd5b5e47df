"""Study ``dropout_stability`` (issue 20): per-model dropout instability equal to the core function on the stored
models (exactly 0 with p = 1), the dropout path's end points at the two models, the tables' means, the run's
and a sweep's figures rebuilt from files, bad input in one line before anything is trained."""

import json
import shutil
import subprocess
import sys

import pytest
from test_cli import lmc_run
from test_star_study import in_process

from lmc.core.data import load_dataset
from lmc.core.dropout import dropout_stability
from lmc.core.models import build_model
from lmc.core.permutation import permutation_spec
from lmc.errors import ConfigError
from lmc.io import load_verified, read_curves

TINY = ["study=dropout_stability", "model.width=16", "model.depth=1", "train.epochs=2", "seeds=[0,1,2,3]",
        "study.samples=3", "interp.num_alphas=3", "progress=false", "logger=none"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("dropout")
    store, run_dir = tmp / "store", tmp / "out"
    proc = lmc_run([*TINY, f"store.root={store}", f"hydra.run.dir={run_dir}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, store, run_dir, json.loads((run_dir / "results.json").read_text()), proc.stdout


def test_dropout_instability_is_the_core_measure_of_the_stored_models(tiny, data_root):
    _, _, run_dir, results, stdout = tiny
    assert results["study"] == "dropout_stability" and results["pairs"] == [[0, 1], [2, 3]]
    assert results["hidden_groups"] == {"P_fc1": 16} and results["p"] == 0.5
    data = load_dataset("mnist1d", data_root)
    model = build_model("mlp", data.input_shape, data.num_classes, width=16, depth=1)
    spec = permutation_spec(model, data.x_train[:2])
    gaps = []
    for seed in ("0", "3"):
        state = load_verified(run_dir / "checkpoints" / f"model_{seed}.pt")["model"]
        model.load_state_dict(state)
        st = dropout_stability(model, spec, state, data.x_train, data.y_train, p=0.5, samples=3, seed=0)
        ours = results["stability"][seed]["train"]
        assert ours["dropped_loss"] == pytest.approx(st.dropped_loss, abs=1e-6)
        assert ours["loss_gap"] == pytest.approx(st.loss_gap, abs=1e-6) and len(ours["dropped_error"]) == 3
    gaps = [m["train"]["loss_gap"] for m in results["stability"].values()]
    assert results["dropout"]["train"]["loss_gap"] == pytest.approx(sum(gaps) / 4)
    assert results["dropout"]["train"]["n"] == 4 and "dropout instability" in stdout


def test_the_dropout_path_ends_at_the_two_models_and_the_tables_average_the_pairs(tiny):
    _, _, run_dir, results, _ = tiny
    rows = read_curves(run_dir)
    assert {r["method"] for r in rows} == {"linear", "dropout_path", "linear_weight_matching",
                                           "dropout_path_weight_matching"}
    for k, (a, b) in enumerate(results["pairs"]):
        for method in ("linear", "dropout_path"):
            path = sorted((r for r in rows if r["method"] == method and r["pair"] == str(k) and r["split"] == "test"),
                          key=lambda r: r["alpha"])
            assert len(path) == (3 if method == "linear" else 11)  # 3 α per segment, corners once
            assert path[0]["loss"] == pytest.approx(results["endpoints"][str(a)]["test"]["loss"], abs=1e-6)
            assert path[-1]["loss"] == pytest.approx(results["endpoints"][str(b)]["test"]["loss"], abs=1e-6)
    paths = results["paths"]
    assert len(paths) == 2 * 4 * 2  # pairs × paths × splits
    sel = [p["loss_excess"] for p in paths if p["path"] == "dropout_path" and p["split"] == "train"]
    assert results["barriers"]["dropout_path"]["train"]["loss_excess"] == pytest.approx(sum(sel) / 2)
    assert results["barriers"]["dropout_path"]["train"]["n"] == 2


def test_keeping_every_unit_is_exactly_stable_and_reuses_the_models(tiny, data_root):
    tmp, store, _, first, _ = tiny
    again = in_process(tmp, data_root, [*TINY, "study.p=1.0", "align=none", f"store.root={store}"], "p1")
    assert all(again["reused"].values()) and again["store"]["hashes"] == {k: v for k, v in
                                                                          first["store"]["hashes"].items()
                                                                          if k.startswith("model/")}
    for model in again["stability"].values():
        for split in ("train", "test"):
            assert model[split]["loss_gap"] == 0.0 and model[split]["error_gap"] == 0.0
    assert set(again["barriers"]) == {"linear", "dropout_path"}
    assert again["barriers"]["dropout_path"] == first["barriers"]["dropout_path"]  # the path keeps halves


def test_figures_redraw_from_the_run_directory_and_a_sweep(tiny, tmp_path):
    _, _, run_dir, _, _ = tiny
    (run_dir / "paths.png").unlink()
    sweep = tmp_path / "sweep"
    for job, width in (("0", 16), ("1", 32)):  # a sweep of two widths, made of the run's files
        shutil.copytree(run_dir, sweep / job, symlinks=True)
        results = json.loads((sweep / job / "results.json").read_text())
        results["config"]["model"]["width"] = width
        (sweep / job / "results.json").write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir), "--sweep", str(sweep), "--x",
                           "model.width", "--split", "train"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (run_dir / "paths.png", sweep / "barrier_vs_model.width.png", sweep / "dropout_vs_model.width.png"):
        assert path.stat().st_size > 10_000 and str(path) in proc.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("study.p=0", "study.p must be"),
    ("study.p=1.5", "study.p is the fraction of units kept, in (0, 1], got 1.5"),
    ("study.samples=0", "study.samples must be a positive integer, got 0"),
    ("seeds=[0,1,2]", "study=dropout_stability pairs the seeds in order, so it needs an even number of them"),
    ("model=soft_trees", "model soft_trees declares its own symmetry"),
    ("model.width=1", "the dropout path needs at least 2 units per hidden layer; group P_fc1 has 1"),
    ("spawn.step=3", "use spawn.step=null and data.split=none"),
])
def test_bad_settings_are_one_line_before_anything_is_trained(override, message, tmp_path, data_root):
    with pytest.raises(ConfigError) as info:
        in_process(tmp_path, data_root, ["study=dropout_stability", override, f"store.root={tmp_path / 'store'}",
                                         "logger=none", "progress=false"], "out")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "store" / "models").exists()


def test_bad_input_on_the_command_line_exits_2_with_one_line(tmp_path, data_root):
    proc = lmc_run(["study=dropout_stability", "study.p=2", f"store.root={tmp_path / 's'}", "logger=none"],
                   tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: study.p is the fraction of units kept, in (0, 1], got 2.0"]
