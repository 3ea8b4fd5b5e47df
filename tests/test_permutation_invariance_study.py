"""Study ``permutation_invariance`` (issue 20): real and oracle pairs end to end — the oracle B stays A permuted
through training, weight matching finds every planted unit and removes the oracle's barrier, annealing runs as
``align=annealing``, epochs used under ``train.stop_loss`` recorded; figures rebuilt from files (a run's and a
sweep's); bad input in one line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from test_cli import lmc_run
from test_star_study import in_process

from lmc.core.data import load_dataset
from lmc.core.models import build_model
from lmc.core.oracle import permuted_copy
from lmc.core.permutation import apply_permutation, permutation_spec
from lmc.core.training import seeded_init
from lmc.errors import ConfigError
from lmc.io import load_verified, read_curves

TINY = ["study=permutation_invariance", "align=annealing", "align.steps=300", "align.metric=loss",
        "align.t_start=0.3", "align.t_end=1e-4", "model.width=8", "model.depth=1", "train.epochs=5",
        "train.stop_loss=2.2", "seeds=[0,1]", "interp.num_alphas=3", "progress=false", "logger=none"]
METHODS = ["naive", "weight_matching", "activation_matching", "annealing"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("invariance")
    store, run_dir = tmp / "store", tmp / "out"
    proc = lmc_run([*TINY, f"store.root={store}", f"hydra.run.dir={run_dir}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, store, run_dir, json.loads((run_dir / "results.json").read_text()), proc.stdout


def test_the_oracle_b_is_a_permuted_and_weight_matching_finds_it(tiny, data_root):
    _, _, run_dir, results, stdout = tiny
    assert results["study"] == "permutation_invariance" and results["pairs"] == [[0, 1]]
    models = results["models"]
    assert {n: m["role"] for n, m in models.items()} == {"0": "a", "1": "real_b", "oracle0": "oracle_b"}
    data = load_dataset("mnist1d", data_root)
    build = lambda: build_model("mlp", data.input_shape, data.num_classes, width=8, depth=1)  # noqa: E731
    spec = permutation_spec(build(), data.x_train[:2])
    _, answer = permuted_copy(spec, seeded_init(build, 0).state_dict(), seed=1)  # planted from the pair's 2nd seed
    sd_a = load_verified(run_dir / "checkpoints" / "model_0.pt")["model"]
    sd_b = load_verified(run_dir / "checkpoints" / "model_oracle0.pt")["model"]
    assert any(not torch.allclose(sd_b[k], v) for k, v in sd_a.items())
    back = apply_permutation(spec, answer, sd_b)
    for key, value in sd_a.items():  # trained with A's seeds from A's permuted init: still A, permuted
        torch.testing.assert_close(back[key], value, rtol=1e-5, atol=1e-6)
    found = {f["method"]: f["all"] for f in results["found"]}
    assert list(found) == METHODS and found["weight_matching"] == 1.0 and found["activation_matching"] == 1.0
    assert 0 <= found["annealing"] <= 1
    oracle = results["oracle"]
    assert oracle["weight_matching"]["removed"]["train"]["loss"] == pytest.approx(1.0, abs=1e-4)
    assert results["barriers"]["oracle/weight_matching"]["train"]["loss"] == pytest.approx(0.0, abs=1e-5)
    assert results["barriers"]["oracle/naive"]["train"]["loss"] > 0.01  # a real barrier to remove
    assert results["barriers"]["real/naive"]["train"]["n"] == 1
    assert "planted units found" in stdout


def test_epochs_used_under_stop_loss_are_recorded(tiny):
    _, store, _, results, _ = tiny
    for m in results["models"].values():
        history = json.loads((store / "models" / m["hash"] / "meta.json").read_text())["history"]
        below = [i + 1 for i, h in enumerate(history) if h["loss"] < 2.2]
        assert m["epochs"] == len(history) and (below[:1] == [m["epochs"]] if m["stopped"] else not below)
    epochs = [m["epochs"] for m in results["models"].values()]
    assert min(epochs) < 5  # the threshold stopped some model early
    t = results["training"]
    assert (t["stop_loss"], t["max_epochs"], t["epochs_min"], t["epochs_max"]) == (2.2, 5, min(epochs), max(epochs))


def test_curves_and_tables_agree(tiny):
    _, _, run_dir, results, _ = tiny
    rows = read_curves(run_dir)
    assert {(r["kind"], r["method"]) for r in rows} == {(k, m) for k in ("real", "oracle") for m in METHODS}
    assert len(rows) == 2 * 4 * 2 * 3  # kinds × methods × splits × α
    for r in results["per_pair"]:
        assert results["barriers"][f"{r['kind']}/{r['method']}"][r["split"]]["error"] == r["error"]


def test_oracle_off_and_the_store_reused(tiny, data_root):
    tmp, store, _, first, _ = tiny
    again = in_process(tmp, data_root, [*TINY, "study.oracle=false", "study.methods=[naive,weight_matching]",
                                        f"store.root={store}"], "again")
    assert all(again["reused"].values()) and set(again["models"]) == {"0", "1"}
    assert set(again["barriers"]) == {"real/naive", "real/weight_matching"} and again["oracle"] == {}
    assert again["barriers"]["real/naive"] == first["barriers"]["real/naive"]


def test_figures_redraw_from_the_run_directory_and_a_sweep(tiny, tmp_path):
    _, _, run_dir, _, _ = tiny
    (run_dir / "barriers.png").unlink()
    sweep = tmp_path / "sweep"
    for job, width in (("0", 8), ("1", 16)):
        shutil.copytree(run_dir, sweep / job, symlinks=True)
        results = json.loads((sweep / job / "results.json").read_text())
        results["config"]["model"]["width"] = width
        (sweep / job / "results.json").write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir), "--sweep", str(sweep), "--x",
                           "model.width"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (run_dir / "barriers.png", sweep / "barrier_vs_model.width.png",
                 sweep / "invariance_vs_model.width.png"):
        assert path.stat().st_size > 10_000 and str(path) in proc.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("seeds=[0,1,2]", "study=permutation_invariance pairs the seeds in order, so it needs an even number of them"),
    ("study.methods=[naive,magic]", "study.methods must be distinct names among naive, weight_matching"),
    ("study.methods=[]", "study.methods must be distinct names"),
    ("model=soft_trees", "model soft_trees declares its own symmetry"),
    ("data.split=halves", "use spawn.step=null and data.split=none"),
    ("train.stop_loss=0", "train.stop_loss must be a positive number, got 0.0"),
    ("align.steps=0", "align.steps must be a positive integer, got 0"),
])
def test_bad_settings_are_one_line_before_anything_is_trained(override, message, tmp_path, data_root):
    with pytest.raises(ConfigError) as info:
        in_process(tmp_path, data_root, ["study=permutation_invariance", "align=annealing", override,
                                         f"store.root={tmp_path / 'store'}", "logger=none", "progress=false"], "out")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "store" / "models").exists()


def test_bad_input_on_the_command_line_exits_2_with_one_line(tmp_path, data_root):
    proc = lmc_run(["study=permutation_invariance", "study.methods=[naive,naive]", f"store.root={tmp_path / 's'}",
                    "logger=none"], tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: study.methods must be distinct names among naive, weight_matching, activation_matching, ste, "
        "sinkhorn, annealing; got ['naive', 'naive']"]
