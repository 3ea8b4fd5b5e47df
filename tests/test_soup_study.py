"""Study ``soup`` (issue 18): children fine-tuned from a parent through the store, their merges, SWA along
one run, the shifted test set, the loss plane; end to end on tiny settings, figures offline, bad keys.

The merging methods themselves (known answers, plain references) are tested in ``test_merging.py``."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from fake_datasets import tiny_data
from hydra import compose, initialize_config_dir
from test_cli import lmc_run
from torch import nn

from lmc.config import settings_from_config
from lmc.core.data.shifted import DEFAULT_SHIFT, SHIFTED_TEST_SETS, RandomShift, mnist1d_shifted, shifted_test_set
from lmc.core.training import TrainConfig, train
from lmc.errors import ConfigError
from lmc.io import CheckpointDir
from lmc.run import CONF_DIR, run
from lmc.stages.endpoints import kept_states, trained_model
from lmc.stages.merging import fine_tuned_model, finetune_from, permutation_digest, stored_statistics
from lmc.stages.store import Store
from lmc.studies import load_study
from lmc.studies.soup import parse_children

TINY = ["study=soup", "model.width=16", "model.depth=1", "train.epochs=2", "seeds=[0]",
        "study.children=[{lr:1e-3,seed:1},{lr:3e-3,seed:2,augment:true},{lr:1e-3,epochs:1,weight_decay:0.01,seed:3}]",
        "study.independent=2", "study.val_size=200", "study.stat_batches=1", "study.shift_samples=100",
        "study.swa_child=0", "study.swa_epochs=[1,2]", "study.plane_points=3", "interp.num_alphas=3",
        "progress=false", "logger=none"]


def build():
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 2))


# ---------------------------------------------------------------------------------- children, the store

def test_a_child_is_its_parent_fine_tuned_with_a_fresh_optimiser_and_trained_once(tmp_path):
    data = tiny_data(96)
    store = Store(tmp_path)
    parent_cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2)
    parent = trained_model(store, {"role": "parent", "seeds": {"init": 0, "data": 0, "aug": 0}}, build, data,
                           parent_cfg, progress=False)
    child_cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-2, optimizer="sgd", label_smoothing=0.1)
    settings = {"role": "child", "parent": parent.hash, "seeds": {"init": 0, "data": 7, "aug": 7}}
    child = fine_tuned_model(store, settings, build, parent, data, child_cfg, progress=False)
    # the same as training the parent's weights by hand with the child's recipe and data-order seed
    by_hand = build()
    by_hand.load_state_dict(parent.model.state_dict())
    train(by_hand, data, child_cfg, data_seed=7, progress=False)
    for k, v in by_hand.state_dict().items():
        assert torch.equal(child.model.state_dict()[k], v), k
    assert not torch.equal(child.model.state_dict()["0.weight"], parent.model.state_dict()["0.weight"])
    assert len(child.history) == 1 and not child.reused
    again = fine_tuned_model(store, settings, build, parent, data, child_cfg, progress=False)
    assert again.reused and again.hash == child.hash
    meta = json.loads((child.path / "meta.json").read_text())
    assert meta["settings"]["parent"] == parent.hash
    with pytest.raises(ValueError, match="parent's hash"):
        fine_tuned_model(store, {**settings, "parent": "other"}, build, parent, data, child_cfg, progress=False)


def test_swa_checkpoints_of_a_child_are_replayed_from_its_parent(tmp_path):
    """A child stored without kept checkpoints: kept_states replays it with the fine-tuning hook, and the
    replay must end in exactly the stored weights (it does only if the hook starts from the parent)."""
    data = tiny_data(64)
    store = Store(tmp_path)
    parent = trained_model(store, {"role": "parent", "seeds": {"init": 1, "data": 1, "aug": 1}}, build, data,
                           TrainConfig(epochs=1, batch_size=32), progress=False)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2, schedule="constant")
    settings = {"role": "child", "parent": parent.hash, "seeds": {"init": 1, "data": 2, "aug": 2}}
    child = fine_tuned_model(store, settings, build, parent, data, cfg, progress=False)
    states = kept_states(store, child, settings, build, data, cfg, [2, 3],
                         fit=finetune_from(parent.model.state_dict()))
    assert sorted(states) == [4, 6]  # epochs 2 and 3 of 2 steps each
    for k, v in states[6]["model"].items():
        assert torch.equal(v, child.model.state_dict()[k])
    by_hand = build()
    by_hand.load_state_dict(parent.model.state_dict())
    train(by_hand, data, cfg, data_seed=2, progress=False, stop_step=4)
    for k, v in by_hand.state_dict().items():
        assert torch.equal(states[4]["model"][k], v), k
    assert set(CheckpointDir(child.path / "checkpoints").kept()) == {4, 6}  # kept for later calls


def test_statistics_are_computed_once_and_keyed_by_the_permutation(tmp_path):
    store = Store(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(3.0)}

    key = {"model": "abc", "permutation": None, "batches": 2}
    first, h, reused = stored_statistics(store, "fisher", key, compute)
    second, h2, reused2 = stored_statistics(store, "fisher", key, compute)
    assert len(calls) == 1 and not reused and reused2 and h == h2 and torch.equal(second["w"], first["w"])
    perm = {"P_0": torch.tensor([1, 0, 2])}
    assert permutation_digest(perm) == permutation_digest({"P_0": torch.tensor([1, 0, 2])})
    assert permutation_digest(perm) != permutation_digest({"P_0": torch.tensor([0, 1, 2])})
    _, h3, _ = stored_statistics(store, "fisher", {**key, "permutation": permutation_digest(perm)}, compute)
    assert h3 != h and len(calls) == 2


# ------------------------------------------------------------------------------- children's recipes

def test_children_override_the_recipe_and_are_checked():
    base = TrainConfig(epochs=10, lr=1e-3)
    children = parse_children(base, [{"lr": 3e-4, "seed": 1}, {"epochs": 5, "label_smoothing": 0.1, "seed": 2,
                                                                "augment": True}])
    assert [c.name for c in children] == ["c0", "c1"]
    assert children[0].cfg == replace(base, lr=3e-4) and children[0].augment is None and children[0].seed == 1
    assert children[1].cfg.epochs == 5 and children[1].cfg.lr == 1e-3 and children[1].augment is True
    for entries, message in (
        ([{"lr": 1e-3}], "study.children[0].seed is required"),
        ([{"lr": -1, "seed": 1}], "study.children[0].lr must be a positive number, got -1"),
        ([{"seed": 1, "lrr": 1}], "unknown key study.children[0].lrr; valid: augment, batch_size,"),
        ([{"seed": 1, "keep_checkpoints": [1]}], "study.children[0].keep_checkpoints is not a child's recipe"),
        ([{"seed": 1}, {"seed": 1}], "study.children[1] repeats study.children[0]"),
        ([{"seed": 1, "augment": "yes"}], "study.children[0].augment must be true or false, got 'yes'"),
        (["lr"], "study.children[0] must be a mapping"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_children(base, entries)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_random_shift_rolls_each_sequence_within_its_range():
    x = torch.arange(40.0).repeat(200, 1)
    out = RandomShift(3)(x, torch.Generator().manual_seed(0))
    shifts = (out[:, 0] - x[:, 0]).remainder(40)  # a roll by s puts x[-s] first
    shifts = torch.where(shifts > 20, shifts - 40, shifts).long()
    for i in range(len(x)):
        assert torch.equal(out[i], x[i].roll(-int(shifts[i])))
    assert set(shifts.tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    again = RandomShift(3)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    channels = RandomShift(2)(x[:4, None].repeat(1, 3, 1), torch.Generator().manual_seed(1))
    assert all(torch.equal(channels[i, 0], channels[i, 2]) for i in range(4))  # one shift per example
    with pytest.raises(ConfigError, match="sequence batches"):
        RandomShift(1)(torch.zeros(2, 1, 4, 4), torch.Generator())


def test_shifted_test_sets_are_registered_by_dataset():
    assert SHIFTED_TEST_SETS["mnist1d"] is mnist1d_shifted
    x, y = shifted_test_set("mnist1d", DEFAULT_SHIFT, 20, seed=1)
    x0, y0 = mnist1d_shifted(DEFAULT_SHIFT, 20, seed=1)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    with pytest.raises(ConfigError, match="dataset 'cifar10' has no shifted test set; datasets with one: mnist1d"):
        shifted_test_set("cifar10", {}, 10, seed=0)


# ------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def soup_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("soup")
    proc = lmc_run([*TINY, f"store.root={tmp / 'store'}", f"hydra.run.dir={tmp / 'out'}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.loads((tmp / "out" / "results.json").read_text()), proc


def test_soup_run_writes_the_merges_table(soup_run):
    _, results, proc = soup_run
    assert results["study"] == "soup" and results["seeds"] == [0]
    assert results["splits"] == {"val": 200, "test": 1000, "shifted": 100}
    merges = {(r["group"], r["method"]): r for r in results["merges"]}
    fine = {m for g, m in merges if g == "fine-tuned"}
    assert fine == {"parent", "c0", "c1", "c2", "best child", "ensemble", "uniform soup", "greedy soup",
                    "model stock (2)", "model stock", "fisher", "regmean", "swa"}
    assert {g for g, _ in merges} == {"fine-tuned", "independent (naive)", "independent (weight_matching)"}
    for r in results["merges"]:
        for split in ("val", "test", "shifted"):
            assert 0 <= r[f"{split}_acc"] <= 1 and r[f"{split}_loss"] > 0 and r[f"{split}_acc_std"] == 0
    assert merges[("fine-tuned", "uniform soup")]["members"] == [["c0", "c1", "c2"]]
    assert merges[("fine-tuned", "model stock (2)")]["members"] == [["parent", "c0", "c1"]]
    assert merges[("fine-tuned", "swa")]["members"] == [["c0@ep1", "c0@ep2"]]
    # the best child is the child with the highest validation accuracy, reported with its own numbers
    children = [merges[("fine-tuned", c)] for c in ("c0", "c1", "c2")]
    best = merges[("fine-tuned", "best child")]
    assert best["val_acc"] == max(c["val_acc"] for c in children)
    assert best["test_acc"] == next(c for c in children if c["val_acc"] == best["val_acc"])["test_acc"]
    # greedy soup: never below the best child on the validation split, its order by validation accuracy
    greedy = results["greedy"][0]
    assert merges[("fine-tuned", "greedy soup")]["val_acc"] >= best["val_acc"]
    accs = {c: merges[("fine-tuned", c)]["val_acc"] for c in ("c0", "c1", "c2")}
    assert [accs[c] for c in greedy["order"]] == sorted(accs.values(), reverse=True)
    assert greedy["kept"][0] == greedy["order"][0] and len(greedy["steps"]) == 3
    assert all(step["val_acc"] >= best["val_acc"] for step in greedy["steps"])
    # Model Stock: a ratio per weight tensor, t = 2cos/(1+cos) for two children
    stock = results["model_stock"]["model stock (2)"]
    assert set(stock["ratios"]) == {"fc1.weight", "fc1.bias", "head.weight", "head.bias"}
    for key, t in stock["ratios"].items():
        cos = stock["cosines"][key]
        assert t == pytest.approx(2 * cos / (1 + cos))
    # the independent models' group: i0 is the parent's own run, so it comes from the store
    assert results["reused"]["0/i0"] and not results["reused"]["0/parent"]
    assert results["store"]["hashes"]["0/i0"] == results["store"]["hashes"]["0/parent"]
    assert set(results["barriers"]) == {"fine-tuned", "independent (naive)", "independent (weight_matching)"}
    assert results["plane"]["models"] == ["parent", "c0", "c1"] and len(results["plane"]["a"]) >= 3
    assert "greedy soup (seed 0)" in proc.stdout


def test_soup_plane_corners_are_the_models_own_losses(soup_run):
    _, results, _ = soup_run
    plane = results["plane"]
    merges = {(r["group"], r["method"]): r for r in results["merges"]}
    for name, (a, b) in zip(plane["models"], plane["coords"]):
        row, col = plane["b"].index(b), plane["a"].index(a)
        assert plane["loss"][row][col] == pytest.approx(merges[("fine-tuned", name)]["test_loss"], abs=1e-5)
        assert plane["acc"][row][col] == pytest.approx(merges[("fine-tuned", name)]["test_acc"], abs=1e-9)
    assert set(plane["projections"]) == {"c2", "uniform soup", "greedy soup", "model stock"}


def test_soup_figures_redraw_offline_and_a_second_run_reuses_everything(soup_run, data_root):
    tmp, first, _ = soup_run
    run_dir = tmp / "out"
    for name in ("merges.png", "greedy.png", "plane.png"):
        (run_dir / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("merges.png", "greedy.png", "plane.png"):
        assert (run_dir / name).stat().st_size > 10_000 and name in proc.stdout
    overrides = [*TINY, f"store.root={tmp / 'store'}", f"data.root={data_root}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    again = run(cfg, tmp / "again", overrides)
    assert all(again["reused"].values()), [k for k, v in again["reused"].items() if not v]
    assert {k for k in again["reused"] if "/" in k} >= {"0/c0/fisher", "0/c0/gram", "0/plane",
                                                        "0/curves/fine-tuned", "0/align/i1"}
    assert again["merges"] == first["merges"]


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("override,message", [
    ("study.children=[{lr:1e-3,seed:1}]", "study.children must list at least 2 fine-tuning runs, got 1"),
    ("study.children=[{lr:1e-3},{seed:2}]", "study.children[0].seed is required"),
    ("study.regmean_alpha=2", "study.regmean_alpha must be in [0, 1], got 2.0"),
    ("study.swa_epochs=[99]", "study.swa_epochs must list epochs 1..10 of child 5's run, got [99]"),
    ("study.swa_child=9", "study.swa_child must index study.children (0..5) or be null, got 9"),
    ("study.plane=[parent,c0,c9]", "study.plane must name three different models of parent, c0, c1,"),
    ("study.independent=1", "study.independent must be 0 (none) or at least 2 models, got 1"),
    ("study.pretrain=half", "unknown study.pretrain 'half'; valid: all, classes, generated"),
    ("study.fisher_labels=true_labels", "unknown study.fisher_labels 'true_labels'; valid: exact, sampled,"),
    ("data_seeds=[1,2]", "study soup takes each child's data-order seed from study.children[i].seed"),
    ("+study.soups=3", "unknown key study.soups for study soup; valid:"),
    ("study.val_size=0", "study.val_size must be a positive integer, got 0"),
])
def test_bad_soup_keys_are_one_line(override, message):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=soup", override])
    with pytest.raises(ConfigError) as info:
        settings = settings_from_config(cfg, [override])
        study, options = load_study(settings.study)
        study.check(settings, options)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_bad_soup_key_from_the_command_line_exits_2_before_anything_is_stored(tmp_path, data_root):
    store = tmp_path / "store"
    proc = lmc_run(["study=soup", "study.plane=[parent,c0]", "logger=none", f"store.root={store}",
                    f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: study.plane must name three different models of parent, c0, c1, c2, c3, "
                                   "c4, c5, got ['parent', 'c0']")
    assert not store.exists()
    proc = lmc_run([*TINY, "data=tensors", "data.path=x.npz", f"store.root={store}",
                    f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, data_root)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "study.shift needs a dataset with a generator (mnist1d), got data tensors" in proc.stderr


def test_parents_on_some_classes_on_generated_data_and_spawned_have_their_own_identity(tmp_path, data_root):
    base = [*TINY, "study.independent=0", "study.swa_child=null", f"store.root={tmp_path / 'store'}",
            f"data.root={data_root}", "study.shift=null"]
    results = {}
    for name, extra in (("classes", ["study.pretrain=classes", "study.pretrain_classes=[0,1,2]"]),
                        ("generated", ["study.pretrain=generated", "study.pretrain_samples=500"]),
                        ("spawned", ["spawn.step=5"])):
        overrides = [*base, *extra]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        results[name] = run(cfg, tmp_path / name, overrides)
    parents = {k: r["store"]["hashes"]["0/parent"] for k, r in results.items()}
    assert len(set(parents.values())) == 3
    store = tmp_path / "store" / "models"
    meta = {k: json.loads((store / h / "meta.json").read_text())["settings"] for k, h in parents.items()}
    assert meta["classes"]["pretrain"] == {"classes": [0, 1, 2]}
    assert meta["generated"]["pretrain"]["samples"] == 500
    assert meta["generated"]["pretrain"]["generator"] == DEFAULT_SHIFT
    assert meta["spawned"]["spawn"] == {"stop_step": 5} and "pretrain" not in meta["spawned"]
    # the spawned parent (5 steps) is far from trained; its children learn from there
    spawned = {r["method"]: r for r in results["spawned"]["merges"] if r["group"] == "fine-tuned"}
    assert spawned["parent"]["test_acc"] < spawned["c0"]["test_acc"]
    overrides = [*base, "spawn.step=1000"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ConfigError, match=r"spawn.step must be an integer step in \[0, 60\]"):
        run(cfg, tmp_path / "bad", overrides)
    assert results["classes"]["splits"] == {"val": 200, "test": 1000}  # study.shift=null: no shifted split
    child = json.loads((store / results["classes"]["store"]["hashes"]["0/c0"] / "meta.json").read_text())
    assert child["settings"]["parent"] == parents["classes"] and "pretrain" not in child["settings"]


def test_batchnorm_models_image_augmentation_and_no_shifted_set(tmp_path, data_root):
    """ResNet-20 (BatchNorm) on small image tensors: every network is evaluated with its statistics
    recomputed on the same batches, so the greedy soup starts from the best child as reported, and the plane's
    corners are the models' own numbers; a child with augment=true trains with random crops and flips."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=500)
    x = (rng.normal(size=(3, 3, 8, 8))[y] + 0.8 * rng.normal(size=(500, 3, 8, 8))).astype(np.float32)
    np.savez(tmp_path / "img.npz", x_train=x[:400], y_train=y[:400], x_test=x[400:], y_test=y[400:])
    overrides = ["study=soup", "data=tensors", f"data.path={tmp_path / 'img.npz'}", "model=resnet20",
                 "model.base_channels=4", "train.epochs=2", "train.batch_size=64", "seeds=[0]",
                 "study.children=[{lr:1e-3,seed:1},{lr:3e-3,seed:2,augment:true}]", "study.val_size=100",
                 "study.shift=null", "study.independent=0", "study.stat_batches=1", "study.stat_batch_size=32",
                 "study.swa_child=1", "study.swa_epochs=[1,2]", "study.plane_points=2", "interp.num_alphas=3",
                 "interp.stat_batches=2", "interp.stat_batch_size=32", "progress=false", "logger=none",
                 f"store.root={tmp_path / 'store'}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    results = run(cfg, tmp_path / "out", overrides)
    assert results["splits"] == {"val": 100, "test": 100}
    merges = {r["method"]: r for r in results["merges"]}
    best = merges["best child"]
    assert merges["greedy soup"]["val_acc"] >= best["val_acc"]
    assert results["greedy"][0]["steps"][0]["val_acc"] == best["val_acc"]
    plane = results["plane"]
    for name, (a, b) in zip(plane["models"], plane["coords"]):
        row, col = plane["b"].index(b), plane["a"].index(a)
        assert plane["loss"][row][col] == pytest.approx(merges[name]["test_loss"], abs=1e-5)
    child = json.loads((tmp_path / "store" / "models" / results["store"]["hashes"]["0/c1"] / "meta.json").read_text())
    assert child["settings"]["augment"] == "Augmentation(crop_padding=4, flip=True)"
    assert merges["swa"]["members"] == [["c1@ep1", "c1@ep2"]]
