"""Study ``layerwise`` (issue 16): ``python -m lmc.run study=layerwise`` end to end on a tiny MLP, its tables
against what the definitions give by construction, the store, the figures offline, and bad inputs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_cli import lmc_run

from lmc.core.barriers import barrier, midpoint_barrier
from lmc.core.layerwise import LAYERWISE_COLUMNS
from lmc.errors import ConfigError
from lmc.io import load_verified, read_curves
from lmc.run import CONF_DIR, run
from lmc.studies.layerwise import cumulative_curves, epochs_of, heatmap_matrix, layers_of, orders_of, sets_of

TINY = ["study=layerwise", "model.width=16", "model.depth=2", "train.epochs=2", "study.random_samples=3",
        "study.random_order_seeds=[0]", "progress=false", "logger=none"]
LAYERS = ["fc1", "fc2", "head"]
FIGURES = ("heatmap.png", "cumulative.png", "random_direction.png")


def in_process(tmp_path, data_root, overrides, name):
    overrides = [*overrides, f"data.root={data_root}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return run(cfg, tmp_path / name, overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("layerwise")
    store, run_dir = tmp / "store", tmp / "out"
    proc = lmc_run([*TINY, f"store.root={store}", f"hydra.run.dir={run_dir}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, store, run_dir, json.loads((run_dir / "results.json").read_text()), proc.stdout


def curve(rows, method="naive", set_name="", base="", epoch="", split="train"):
    return {r["alpha"]: r for r in rows if (r["method"], r["set"], r["base"], r["epoch"], r["split"])
            == (method, set_name, base, epoch, split)}


def test_the_paper_pair_and_every_set_into_both_bases(tiny):
    _, store, run_dir, results, stdout = tiny
    assert results["study"] == "layerwise" and list(layers_of(results)) == LAYERS
    assert layers_of(results)["fc1"] == ["fc1.weight", "fc1.bias"]
    # the paper's pair: one init, two data orders (spawned at step 0)
    seeds = [json.loads((store / "models" / results["store"]["hashes"][t] / "meta.json").read_text())["settings"]
             for t in "ab"]
    assert [s["seeds"]["init"] for s in seeds] == [0, 0] and [s["seeds"]["data"] for s in seeds] == [0, 1]
    assert seeds[0]["spawn"]["step"] == 0
    orders = orders_of(results)
    assert orders == {"shallow": LAYERS, "deep": LAYERS[::-1], "random0": orders["random0"],
                      "minimal": ["fc1", "head", "fc2"]} and sorted(orders["random0"]) == sorted(LAYERS)
    kinds = {}
    for info in sets_of(results).values():
        kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
    assert kinds == {"single": 3, "cumulative": 4 * 3, "window": 2, "random_dir": 3 * 3}
    assert sets_of(results)["window2_fc2-head"] == {"kind": "window", "layer": "fc2", "layers": ["fc2", "head"]}
    assert results["over_training"] == [{"epoch": 1, "step": 32}, {"epoch": 2, "step": 64}]
    # one record per (method, set, base, epoch, split): final sets, and single layers at every epoch
    final = [r for r in results["layerwise"] if r["epoch"] == ""]
    assert len(final) == 2 * (1 + 2 * (3 + 12 + 2 + 9))
    for epoch in (1, 2):
        at = [r for r in results["layerwise"] if r["epoch"] == epoch]
        assert len(at) == 2 * (1 + 2 * 3) and {r["kind"] for r in at} == {"whole", "single"}
    assert "largest single layer" in stdout and (run_dir / "checkpoints" / "model_b.pt").is_file()


def test_rows_hold_the_definitions_by_construction(tiny):
    _, _, run_dir, results, _ = tiny
    rows = read_curves(run_dir)
    assert set(LAYERWISE_COLUMNS) <= set(rows[0]) and {r["base"] for r in rows} == {"", "a", "b"}
    rows = [{**r, "epoch": int(r["epoch"]) if r["epoch"] else ""} for r in rows]
    records = {(r["method"], r["set"], r["base"], r["epoch"], r["split"]): r for r in results["layerwise"]}
    for split in ("train", "test"):
        whole = curve(rows, split=split)
        assert sorted(whole) == [0.0, 0.5, 1.0]
        for name in sets_of(results):
            into_a, into_b = curve(rows, set_name=name, base="a", split=split), \
                curve(rows, set_name=name, base="b", split=split)
            # into A at α = 0 is A itself and into B at α = 1 is B: their barrier terms are zero
            assert into_a[0.0]["loss"] == whole[0.0]["loss"] and into_b[1.0]["loss"] == whole[1.0]["loss"]
            for base, points in (("a", into_a), ("b", into_b)):
                alphas = sorted(points)
                values = [points[a]["loss"] for a in alphas]
                record = records[("naive", name, base, "", split)]
                assert record["loss"] == pytest.approx(barrier(alphas, values, whole[0.0]["loss"], whole[1.0]["loss"]))
                assert record["loss"] >= 0.0  # the max includes the endpoint's term, zero
                assert record["loss_midpoint"] == pytest.approx(
                    midpoint_barrier(alphas, values, whole[0.0]["loss"], whole[1.0]["loss"]))
        # the cumulative set of all layers is the whole model, in every order and for both bases
        for order in orders_of(results):
            for base in ("a", "b"):
                full = curve(rows, set_name=f"cum_{order}_3", base=base, split=split)
                for alpha in (0.0, 0.5, 1.0):
                    assert full[alpha]["loss"] == pytest.approx(whole[alpha]["loss"], abs=1e-6)
                    assert full[alpha]["acc"] == pytest.approx(whole[alpha]["acc"], abs=1e-9)
    head = results["headline"]["naive"]["train"]
    assert head["full_cumulative_loss"] == pytest.approx(head["whole_loss"], abs=1e-6)
    assert results["barriers"]["naive"]["train"]["loss"] == head["whole_loss"]


def test_random_direction_moves_the_averaging_distance(tiny):
    _, _, run_dir, results, _ = tiny
    sd_a, sd_b = (load_verified(run_dir / "checkpoints" / f"model_{t}.pt")["model"] for t in "ab")
    entries = [e for e in results["random_direction"] if e["epoch"] == ""]
    assert len(entries) == 3 * 2 * 2  # layers × bases × splits
    for e in entries:
        keys = layers_of(results)[e["layer"]]
        distance = math.sqrt(sum(((sd_b[k].double() - sd_a[k].double()) ** 2).sum().item() for k in keys))
        assert e["averaging_distance"] == pytest.approx(distance, rel=1e-9)
        assert e["random_distance"] == pytest.approx(distance, rel=1e-5)
        assert e["samples"] == 3
        single = next(r for r in results["layerwise"] if (r["set"], r["base"], r["epoch"], r["split"])
                      == (e["layer"], e["base"], "", e["split"]))
        assert e["averaging_loss"] == single["loss"]
        samples = [r["loss"] for r in results["layerwise"] if r["kind"] == "random_dir" and r["layer"] == e["layer"]
                   and r["base"] == e["base"] and r["split"] == e["split"]]
        assert e["random_loss"] == pytest.approx(np.mean(samples)) and e["random_loss_std"] == pytest.approx(
            np.std(samples, ddof=1))


def test_heatmap_has_a_row_per_layer_and_a_column_per_kept_epoch(tiny):
    _, _, _, results, _ = tiny
    records = results["layerwise"]
    for base in ("a", "b"):
        layers, epochs, matrix = heatmap_matrix(records, list(layers_of(results)), "naive", base)
        assert layers == LAYERS and epochs == [1, 2] and matrix.shape == (3, 2) and np.isfinite(matrix).all()
        # the last kept epoch is the final model: its column equals the final single-layer barriers
        final = {r["layer"]: r["loss_midpoint"] for r in records
                 if (r["kind"], r["base"], r["epoch"], r["split"]) == ("single", base, "", "train")}
        assert matrix[:, 1] == pytest.approx([final[layer] for layer in LAYERS], abs=1e-6)
    curves = cumulative_curves(records, orders_of(results), "naive", "a")
    assert set(curves) == set(orders_of(results)) and all(len(v) == 3 for v in curves.values())
    assert len({round(v[-1], 9) for v in curves.values()}) == 1  # every order ends at the whole model


def test_figures_redraw_from_the_run_directory(tiny):
    _, _, run_dir, _, _ = tiny
    for name in FIGURES:
        (run_dir / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in FIGURES:
        assert (run_dir / name).stat().st_size > 10_000 and name in proc.stdout


def test_collect_gets_a_few_columns_not_one_per_set(tiny):
    from lmc.report.sweep import job_row

    _, _, run_dir, results, _ = tiny
    (run_dir / ".hydra").mkdir(exist_ok=True)
    row = job_row(run_dir, run_dir.parent)
    assert row["status"] == "ok" and row["headline/naive/train/whole_loss"] == results["headline"]["naive"]["train"][
        "whole_loss"]
    assert not any(k.startswith(("sets/", "layers/", "orders/", "layerwise/")) for k in row) and len(row) < 80


def test_a_second_run_reuses_the_store(tiny, data_root):
    tmp, store, _, first, _ = tiny
    again = in_process(tmp, data_root, [*TINY, f"store.root={store}"], "again")
    assert all(again["reused"].values()) and again["store"]["hashes"] == first["store"]["hashes"]
    assert again["layerwise"] == first["layerwise"]


def test_independent_pair_naive_and_aligned_at_every_kept_epoch(tmp_path, data_root):
    results = in_process(tmp_path, data_root, [*TINY, f"store.root={tmp_path / 'store'}", "study.pair=independent",
                                               "study.orders=[shallow]", "study.windows=[]", "study.random_samples=0",
                                               "study.epochs=[2]", "study.bases=[a]"], "independent")
    assert {r["method"] for r in results["layerwise"]} == {"naive", "weight_matching"}
    assert {r["base"] for r in results["layerwise"]} == {"", "a"}
    assert results["diagnostics"]["weight_matching"]["objective_after"] >= \
        results["diagnostics"]["weight_matching"]["objective_before"]
    at = [r for r in results["layerwise"] if r["epoch"] == 2 and r["method"] == "weight_matching"]
    assert len(at) == 2 * (1 + 3)
    final = {(r["set"], r["split"]): r["loss"] for r in results["layerwise"]
             if r["epoch"] == "" and r["method"] == "weight_matching" and r["kind"] in ("single", "whole")}
    assert {(r["set"], r["split"]): r["loss"] for r in at} == pytest.approx(final, abs=1e-6)
    assert results["random_direction"] == [] and list(orders_of(results)) == ["shallow"]


@pytest.mark.parametrize("overrides,message", [
    (["study.orders=[shallow,sideways]"], "unknown study.orders[1] 'sideways'; valid: shallow, deep, random, minimal"),
    (["study.windows=[2,9]"], "study.windows has width 9, larger than the number of layers (3: fc1, fc2, head); "
                              "valid: 1..3"),
    (["study.blocks=[conv.*]"], "layer block pattern(s) 'conv.*' match no module; modules: fc1, fc2, head"),
    (["study.alphas=[0,0.5]"], "study.alphas must increase from 0 to 1"),
    (["study.epochs=[3]"], "study.epochs must be epochs in 1..2 (train.epochs), all, or []; got [3]"),
    (["study.pair=independent", "spawn.step=5"], "study.pair=independent trains A and B from their own inits"),
    (["data_seeds=[4,4]", "aug_seeds=[4,4]"], "study.pair=spawned needs different data_seeds or aug_seeds"),
])
def test_bad_input_is_one_config_error_before_training(overrides, message, tmp_path, data_root):
    with pytest.raises(ConfigError) as info:
        in_process(tmp_path, data_root, [*TINY, f"store.root={tmp_path / 'store'}", *overrides], "bad")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "store").glob("models/*"))


def test_bad_input_on_the_command_line_is_one_line(tmp_path, data_root):
    proc = lmc_run([*TINY, "study.windows=[5]", f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'o'}"],
                   tmp_path, data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: study.windows has width 5, larger than the number of layers (3: fc1, fc2, "
                                   "head); valid: 1..3")


@pytest.mark.parametrize("experiment", ["layerwise_mnist1d", "layerwise_resnet18_cifar", "layerwise_vgg11_cifar"])
def test_experiments_compose_and_pass_the_study_checks(experiment):
    from lmc.config import settings_from_config
    from lmc.studies import load_study

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"])
    settings = settings_from_config(cfg)
    study, options = load_study(settings.study)
    study.check(settings, options)
    assert study.name == "layerwise" and settings.name == experiment and options.pair == "spawned"
    if "cifar" in experiment:
        assert settings.model.options["norm"] == "none" and settings.train.batch_size == 16


def test_resnet18_without_normalisation_runs_on_fabricated_cifar(tmp_path, monkeypatch):
    from fake_datasets import fabricate, skip_md5_checks

    skip_md5_checks(monkeypatch)
    fabricate("cifar10", tmp_path / "data", n_train=64, n_test=32)
    overrides = ["experiment=layerwise_resnet18_cifar", f"data.root={tmp_path / 'data'}", "model.base_channels=2",
                 "train.epochs=1", "train.batch_size=32", "study.epochs=all", "study.orders=[deep]",
                 "study.windows=[3]", "study.random_samples=1", "study.blocks={stem:conv,layer4:'layer4.*'}",
                 "logger=none", "device=cpu", "progress=false", f"store.root={tmp_path / 'store'}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    results = run(cfg, tmp_path / "out", overrides)
    layers = list(layers_of(results))
    assert layers[0] == "stem" and "layer4" in layers and not any(x.startswith("layer4.") for x in layers)
    assert epochs_of(results) == [1] and results["normalization"]["reset_bn"] is False
    n = len(layers)
    kinds = [info["kind"] for info in results["sets"]]
    assert n == 21 - 5 + 1 and layers_of(results)["layer4"][0] == "layer4.0.conv1.weight"
    assert kinds.count("single") == n and kinds.count("cumulative") == n and kinds.count("window") == n - 2
    assert kinds.count("random_dir") == n


def test_sweep_preset_runs_three_pairs_of_both_models():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=layerwise"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.study.name == "layerwise" and cfg.name == "layerwise_mnist1d"
    assert dict(cfg.hydra.sweeper.params) == {"seeds": "[0,1],[2,3],[4,5]", "model": "mlp,cnn1d"}


def test_models_stored_by_the_pair_study_are_reused_and_their_epochs_replayed(tmp_path, data_root):
    """A pair spawned at step 0 by the pair study (no kept checkpoints) is the layerwise study's pair: the
    models come from the store and their epochs are replayed to the stored weights."""
    store = tmp_path / "store"
    pair = in_process(tmp_path, data_root, [*TINY[1:4], "spawn.step=0", "interp.layerwise=false", "logger=none",
                                            "progress=false", f"store.root={store}"], "pair")
    results = in_process(tmp_path, data_root, [*TINY, "study.orders=[]", "study.windows=[]", "study.random_samples=0",
                                               f"store.root={store}"], "layerwise")
    assert results["reused"]["a"] and results["reused"]["b"] and results["reused"]["parent"]
    assert [results["store"]["hashes"][t] for t in "ab"] == [pair["store"]["hashes"][t] for t in "ab"]
    assert epochs_of(results) == [1, 2]
    kept = sorted(p.name for p in (store / "models" / results["store"]["hashes"]["a"] / "checkpoints").glob("*.pt"))
    assert kept == ["step_00000032.pt", "step_00000064.pt"]  # replayed, and kept in the entry from now on
    final = {(r["set"], r["base"], r["split"]): r["loss"] for r in results["layerwise"] if r["epoch"] == ""}
    last = {(r["set"], r["base"], r["split"]): r["loss"] for r in results["layerwise"] if r["epoch"] == 2}
    assert last == pytest.approx(final, abs=1e-6)  # the replayed last epoch is the stored model


def test_wandb_curves_take_only_the_final_whole_model_rows(tiny):
    """The W&B reader keys curves like every other: rows of another epoch, base or set never overwrite the
    whole-model curve (logged against α); the table keeps every column."""
    from lmc.report.tracking import WandbTracker

    _, _, run_dir, _, _ = tiny
    rows = [r for r in read_curves(run_dir) if r["epoch"] != "2"]  # epoch 2 is the final model: leave it out
    logged = []

    class Run:
        def define_metric(self, *a, **k):
            pass

        def log(self, values):
            logged.append(values)

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    t = WandbTracker.__new__(WandbTracker)
    t.run, t._wandb = Run(), type("W", (), {"Table": Table})
    t.log_curves(rows)
    whole = curve(rows)
    by_alpha = {v["alpha"]: v for v in logged if "alpha" in v}
    assert sorted(by_alpha) == [0.0, 0.5, 1.0]
    for alpha, values in by_alpha.items():
        assert values["interp/naive/train/loss"] == whole[alpha]["loss"]
    table = logged[-1]["curves"]
    assert table.columns[-3:] == ["set", "base", "epoch"] and len(table.data) == len(rows)
    assert {type(row[-1]) for row in table.data} == {str}  # one type per column, or W&B refuses the table


def test_a_later_spawn_step_measures_the_epochs_after_it(tmp_path, data_root):
    """Spawned at step 40 (epoch 1 ends at step 32): only epoch 2 has checkpoints of A and B."""
    common = [*TINY, "study.orders=[]", "study.windows=[]", "study.random_samples=0", "spawn.step=40",
              f"store.root={tmp_path / 'store'}"]
    results = in_process(tmp_path, data_root, common, "late")
    assert epochs_of(results) == [2] and results["store"]["hashes"]["parent"]
    with pytest.raises(ConfigError, match=r"study.epochs \[1\] end before the spawn step \(spawn.step=40, 32 steps"):
        in_process(tmp_path, data_root, [*common, "study.epochs=[1,2]"], "early")
