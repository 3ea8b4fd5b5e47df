"""Study ``over_training`` (issue 20): barriers at every kept epoch read from the stored checkpoints, epoch 0 at
the initialisation, the last epoch at the trained models, spawned children shared with the pair study, the
figure redrawn from the run directory, bad input in one line."""

import json
import subprocess
import sys

import pytest
from test_cli import lmc_run
from test_star_study import in_process

from lmc.core.barriers import barrier, frankle_barrier
from lmc.core.data import load_dataset
from lmc.core.interpolation import sweep
from lmc.core.models import build_model
from lmc.core.training import seeded_init
from lmc.errors import ConfigError
from lmc.io import load_verified

TINY = ["study=over_training", "model.width=16", "model.depth=2", "train.epochs=3", "seeds=[0,1]",
        "study.methods=[naive,weight_matching]", "study.spawn_steps=[0,40]", "interp.num_alphas=5",
        "progress=false", "logger=none"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("over_training")
    store, run_dir = tmp / "store", tmp / "out"
    proc = lmc_run([*TINY, f"store.root={store}", f"hydra.run.dir={run_dir}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, store, run_dir, json.loads((run_dir / "results.json").read_text()), proc.stdout


def _naive(data, state_a, state_b, split="test"):
    model = build_model("mlp", data.input_shape, data.num_classes, width=16, depth=2)
    xy = data.split(split)
    rows = sweep(model, state_a, state_b, [0, 0.25, 0.5, 0.75, 1], {split: xy}, "naive")
    alphas = [r["alpha"] for r in rows]
    return (barrier(alphas, [r["loss"] for r in rows]), barrier(alphas, [1 - r["acc"] for r in rows]),
            frankle_barrier(alphas, [1 - r["acc"] for r in rows]))


def test_every_kept_epoch_reads_the_stored_checkpoints(tiny, data_root):
    _, store, run_dir, results, stdout = tiny
    assert results["study"] == "over_training" and results["epochs"] == [0, 1, 2, 3]
    assert results["steps"] == [0, 32, 64, 96] and results["pairs"] == [[0, 1]]
    per_epoch = results["per_epoch"]
    assert len(per_epoch) == 4 * 2 * 2  # epochs × methods × splits
    data = load_dataset("mnist1d", data_root)
    hashes = [results["store"]["hashes"][f"model/{x}"] for x in (0, 1)]
    folders = [store / "models" / h / "checkpoints" for h in hashes]
    kept = [json.loads((f / "kept.json").read_text()) for f in folders]
    assert sorted(kept[0]) == [f"step_{s:08d}.pt" for s in (32, 64, 96)]  # every epoch kept while training
    for epoch in (1, 2):
        states = [load_verified(f / f"step_{32 * epoch:08d}.pt")["model"] for f in folders]
        loss, error, _ = _naive(data, *states)
        [row] = [r for r in per_epoch if r["epoch"] == epoch and r["method"] == "naive" and r["split"] == "test"]
        assert row["loss"] == pytest.approx(loss, abs=1e-6) and row["error"] == pytest.approx(error, abs=1e-9)
    # epoch 0 is the initialisation; the last kept epoch is the trained models
    build = lambda: build_model("mlp", data.input_shape, data.num_classes, width=16, depth=2)  # noqa: E731
    inits = [seeded_init(build, x).state_dict() for x in (0, 1)]
    [row] = [r for r in per_epoch if r["epoch"] == 0 and r["method"] == "naive" and r["split"] == "test"]
    assert row["loss"] == pytest.approx(_naive(data, *inits)[0], abs=1e-6)
    finals = [load_verified(run_dir / "checkpoints" / f"model_{x}.pt")["model"] for x in (0, 1)]
    [row] = [r for r in per_epoch if r["epoch"] == 3 and r["method"] == "naive" and r["split"] == "test"]
    assert row["loss"] == pytest.approx(_naive(data, *finals)[0], abs=1e-6)
    # aligning never raises the training barrier much at a trained epoch, and the tables agree with the rows
    over = results["over_training"]
    assert over["naive"]["test"]["loss"][2] == pytest.approx(
        next(r["loss"] for r in per_epoch if r["epoch"] == 2 and r["method"] == "naive" and r["split"] == "test"))
    assert over["weight_matching"]["train"]["loss"][3] < over["naive"]["train"]["loss"][3]
    assert results["barriers"]["naive"]["test"]["loss"] == over["naive"]["test"]["loss"][-1]
    assert "barriers over training" in stdout and "against spawn step" in stdout


def test_spawned_children_are_the_pair_study_s(tiny, data_root):
    tmp, store, _, results, _ = tiny
    pair = in_process(tmp, data_root, ["model.width=16", "model.depth=2", "train.epochs=3", "seeds=[0,1]",
                                       "spawn.step=40", "align=none", "interp.num_alphas=5", "interp.layerwise=false",
                                       "logger=none", "progress=false", f"store.root={store}"], "pair")
    assert pair["reused"]["a"] and pair["reused"]["b"] and pair["reused"]["parent"]
    assert pair["store"]["hashes"]["a"] == results["store"]["hashes"]["spawn/40/0/a"]
    [row] = [r for r in results["spawn"] if r["step"] == 40 and r["split"] == "test"]
    assert row["error_frankle"] == pytest.approx(pair["barriers"]["naive"]["test"]["error_frankle"], abs=1e-12)
    inst = results["instability"]["test"]
    assert inst["steps"] == [0, 40] and inst["error_frankle"][1] == row["error_frankle"]
    assert results["stability"] == 0.02


def test_a_model_stored_without_checkpoints_is_replayed_to_them(tmp_path, data_root):
    """Kept checkpoints are not part of a model's identity: a model trained by the pair study (none kept)
    gets them by replaying its training, and the barriers are the same as with checkpoints kept at once."""
    store = tmp_path / "store"
    pair = in_process(tmp_path, data_root, ["model.width=16", "model.depth=2", "train.epochs=2", "seeds=[0,1]",
                                            "align=none", "interp.num_alphas=3", "interp.layerwise=false",
                                            "logger=none", "progress=false", f"store.root={store}"], "pair")
    args = [*TINY[:3], "train.epochs=2", "seeds=[0,1]", "study.methods=[naive]", "study.spawn_steps=[]",
            "interp.num_alphas=3", "progress=false", "logger=none"]
    later = in_process(tmp_path, data_root, [*args, f"store.root={store}"], "later")
    assert later["reused"]["model/0"] and later["store"]["hashes"]["model/0"] == pair["store"]["hashes"]["a"]
    fresh = in_process(tmp_path, data_root, [*args, f"store.root={tmp_path / 'fresh'}"], "fresh")
    assert not fresh["reused"]["model/0"]
    assert later["per_epoch"] == fresh["per_epoch"] and later["spawn"] == [] and later["instability"] == {}


def test_the_figure_redraws_from_the_run_directory(tiny):
    _, _, run_dir, _, _ = tiny
    (run_dir / "over_training.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "over_training.png").stat().st_size > 10_000 and "over_training.png" in proc.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("seeds=[0,1,2]", "study=over_training pairs the seeds in order, so it needs an even number of them"),
    ("study.methods=[naive,magic]", "study.methods must be distinct names among naive, weight_matching"),
    ("study.every=0", "study.every must be a positive integer, got 0"),
    ("study.every=50", "study.every=50 is more than train.epochs=30"),
    ("study.spawn_steps=[5,5]", "study.spawn_steps must be distinct steps"),
    ("study.spawn_steps=[5000]", "study.spawn_steps [5000] beyond training: steps must be in [0, 960]"),
    ("study.stability=2", "study.stability is an error barrier (a fraction) in (0, 1), got 2"),
    ("spawn.step=5", "study=over_training trains every model on the whole training set"),
    ("data_seeds=[3,4]", "data_seeds and aug_seeds are not read"),
])
def test_bad_settings_are_one_line_before_anything_is_trained(override, message, tmp_path, data_root):
    with pytest.raises(ConfigError) as info:
        in_process(tmp_path, data_root, ["study=over_training", override, f"store.root={tmp_path / 'store'}",
                                         "logger=none", "progress=false"], "out")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "store" / "models").exists()


def test_bad_input_on_the_command_line_exits_2_with_one_line(tmp_path, data_root):
    proc = lmc_run(["study=over_training", "study.methods=[]", f"store.root={tmp_path / 's'}", "logger=none"],
                   tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: study.methods must be distinct names among naive, weight_matching, activation_matching, ste, "
        "sinkhorn, annealing; got []"]

