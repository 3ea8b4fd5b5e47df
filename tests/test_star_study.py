"""Study ``star`` (issue 17): ``python -m lmc.run study=star`` end to end, its tables against the core
evaluation, the store (reuse, a killed star model resumed), the figures offline, and bad inputs."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import lmc_run

from lmc.core.models import build_model
from lmc.core.star import StarConfig, StarEvalConfig, StarObjective, evaluate_star
from lmc.errors import ConfigError
from lmc.io import load_verified, read_curves
from lmc.run import CONF_DIR, run
from lmc.studies.star import Star, star_identity

TINY = ["study=star", "model.width=16", "model.depth=2", "train.epochs=2", "study.anchors=[0,1,2]",
        "study.held_out=[10,11]", "study.stars=[20,21]", "interp.num_alphas=5", "progress=false", "logger=none"]
COUNTS = {"star_held_out": 4, "held_out_held_out": 1, "anchor_held_out": 6, "star_anchor": 6}


class Killed(Exception):
    """Stands for the process being killed mid-training."""


def in_process(tmp_path, data_root, overrides, name):
    overrides = [*overrides, f"data.root={data_root}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return run(cfg, tmp_path / name, overrides)


@pytest.fixture(scope="module")
def tiny_star(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("star")
    store, run_dir = tmp / "store", tmp / "out"
    proc = lmc_run([*TINY, f"store.root={store}", f"hydra.run.dir={run_dir}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, store, run_dir, json.loads((run_dir / "results.json").read_text()), proc.stdout


def test_results_hold_every_pair_type_per_pair_and_summarised(tiny_star):
    _, store, run_dir, results, stdout = tiny_star
    assert results["study"] == "star" and results["seeds"] == [0, 1, 2, 10, 11, 20, 21]
    assert set(results["models"]) == {"star0", "star1", "anchor0", "anchor1", "anchor2", "held_out0", "held_out1"}
    assert results["models"]["held_out1"]["seed"] == 11 and results["models"]["star1"]["role"] == "star"
    assert list(results["barriers"]) == list(COUNTS)
    pairs = results["pairs"]
    assert len(pairs) == 2 * sum(COUNTS.values())
    for pair_type, count in COUNTS.items():
        for split in ("train", "test"):
            entry = results["barriers"][pair_type][split]
            values = [p for p in pairs if p["pair_type"] == pair_type and p["split"] == split]
            assert entry["n"] == len(values) == count
            for metric in ("loss", "error"):
                assert entry[metric] == pytest.approx(sum(p[metric] for p in values) / count, abs=1e-12)
                if count > 1:
                    assert entry[f"{metric}_std"] == pytest.approx(
                        torch.tensor([p[metric] for p in values], dtype=torch.float64).std().item(), abs=1e-12)
    head, barriers = results["headline"], results["barriers"]
    assert head["regular"] == "held_out_held_out" and (head["split"], head["metric"]) == ("train", "loss")
    assert head["ratio"] == pytest.approx(barriers["star_held_out"]["train"]["loss"]
                                          / barriers["held_out_held_out"]["train"]["loss"])
    assert head["ratio_anchor_held_out"] == pytest.approx(results["ratios"]["anchor_held_out"]["train"]["loss"])
    assert "star–held-out / held-out–held-out = " in stdout
    assert {p["pair"] for p in pairs if p["pair_type"] == "star_anchor"} == \
        {f"star{s}-anchor{a}" for s in range(2) for a in range(3)}
    # every alignment improved the matching objective
    assert all(d["objective_after"] >= d["objective_before"] for d in results["diagnostics"].values())
    # and was checked at run time to leave the permuted model's function unchanged
    assert all(0 <= d["output_difference"] <= 1e-5 for d in results["diagnostics"].values())
    # curves.csv: every pair's curve with its pair type
    rows = read_curves(run_dir)
    assert len(rows) == sum(COUNTS.values()) * 2 * 5
    assert {r["pair_type"] for r in rows} == set(COUNTS) and {r["method"] for r in rows} == {"weight_matching"}
    # the star model's store identity: its anchors' keys and the star settings
    star = json.loads((store / "models" / results["store"]["hashes"]["star0"] / "meta.json").read_text())
    assert star["settings"]["star"]["anchors"] == [results["store"]["hashes"][f"anchor{i}"] for i in range(3)]
    assert star["settings"]["star"]["t_sampling"] == "uniform" and star["settings"]["seeds"]["init"] == 20
    assert (run_dir / "checkpoints" / "model_star1.pt").is_file()


def test_tables_equal_the_core_evaluation_of_the_same_models(tiny_star, data_root):
    """The study (stored alignments and curves per pair) measures what lmc.core.star.evaluate_star measures."""
    from lmc.core.data import load_dataset

    _, _, run_dir, results, _ = tiny_star
    weights = {name: load_verified(run_dir / "checkpoints" / f"model_{name}.pt")["model"] for name in results["models"]}
    counts = {"star": 2, "anchor": 3, "held_out": 2}
    group = {role: [weights[f"{role}{i}"] for i in range(n)] for role, n in counts.items()}
    data = load_dataset("mnist1d", data_root)
    model = build_model("mlp", data.input_shape, data.num_classes, width=16, depth=2)
    core = evaluate_star(model, group["star"], group["anchor"], group["held_out"], data,
                         StarEvalConfig(num_alphas=5, align_restarts=3))
    assert len(core.pairs) == len(results["pairs"])
    for ours, theirs in zip(results["pairs"], core.pairs):
        assert (ours["pair"], ours["split"]) == (theirs.pair, theirs.split)
        assert ours["loss"] == pytest.approx(theirs.loss, abs=1e-6)
        assert ours["error"] == pytest.approx(theirs.error, abs=1e-9)
    assert results["headline"]["ratio"] == pytest.approx(core.ratio(), rel=1e-6)


def test_figures_redraw_from_the_run_directory(tiny_star):
    _, _, run_dir, _, _ = tiny_star
    for name in ("curves.png", "barriers.png"):
        (run_dir / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("curves.png", "barriers.png"):
        assert (run_dir / name).stat().st_size > 10_000 and name in proc.stdout


def test_later_runs_reuse_the_store_and_a_star_setting_retrains_only_the_star(tiny_star, data_root):
    tmp, store, _, first, _ = tiny_star
    again = in_process(tmp, data_root, [*TINY, f"store.root={store}"], "again")
    assert all(again["reused"].values()) and again["store"]["hashes"] == first["store"]["hashes"]
    assert again["barriers"] == first["barriers"]
    beta = in_process(tmp, data_root, [*TINY, f"store.root={store}", "study.t_sampling=beta",
                                       "study.pair_types=[star_held_out,held_out_held_out]"], "beta")
    hashes, reused = beta["store"]["hashes"], beta["reused"]
    assert all(reused[f"anchor{i}"] for i in range(3)) and reused["held_out0"] and reused["held_out1"]
    assert not reused["star0"] and hashes["star0"] != first["store"]["hashes"]["star0"]
    assert reused["curves/held_out0-held_out1"] and not reused["curves/star0-held_out0"]
    assert list(beta["barriers"]) == ["star_held_out", "held_out_held_out"]
    # a setting the sampling scheme does not use leaves the star model's key alone
    assert star_identity(StarConfig(t_constant=0.2)) == star_identity(StarConfig(t_constant=0.7))


def test_a_killed_star_model_resumes_from_the_store_to_the_same_weights(tmp_path, data_root, monkeypatch, capsys):
    """The star trains 3 epochs of 32 steps (checkpoint at every epoch end); killed at step 41, the next run
    resumes from step 32 and ends with the weights of an uninterrupted run."""
    store = tmp_path / "store"
    args = [*TINY[:4], "study.anchors=[0,1]", "study.held_out=[10,11]", "study.stars=[20]", "study.epochs=3",
            "study.pair_types=[star_held_out]", *TINY[7:], f"store.root={store}"]
    original, calls = StarObjective.loss, [0]

    def loss(self, *a, **k):
        calls[0] += 1
        if calls[0] > 40:
            raise Killed
        return original(self, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(StarObjective, "loss", loss)
        with pytest.raises(Killed):
            in_process(tmp_path, data_root, args, "killed")
    [entry] = [p.parent for p in (store / "models").glob("*/settings.json")
               if "star" in json.loads(p.read_text()) and not (p.parent / "meta.json").exists()]
    assert [f.name for f in (entry / "checkpoints").iterdir() if f.suffix == ".pt"]
    capsys.readouterr()
    resumed = in_process(tmp_path, data_root, args, "resumed")
    assert f"resuming {entry} from" in capsys.readouterr().out
    assert not resumed["reused"]["star0"] and resumed["reused"]["anchor0"]
    weights = load_verified(entry / "model.pt")["model"]
    entry.rename(entry.with_name("resumed"))
    clean = in_process(tmp_path, data_root, args, "clean")
    assert clean["store"]["hashes"]["star0"] == entry.name
    assert all(torch.equal(v, load_verified(entry / "model.pt")["model"][k]) for k, v in weights.items())
    assert clean["barriers"] == resumed["barriers"]


@pytest.mark.parametrize(("override", "message"), [
    ("study.anchors=[]", "study.anchors must be a non-empty list of distinct seeds"),
    ("study.held_out=[1,100]", "study.held_out repeats anchor seeds [1]"),
    ("study.held_out=[100]", "pair type held_out_held_out needs at least two held-out models"),
    ("study.t_sampling=gauss", "unknown study.t_sampling 'gauss'; valid: uniform, beta, constant"),
    ("study.t_constant=1.5", "star.t_constant must lie in [0, 1], got 1.5"),
    ("study.pair_types=[star_held_out,regular]", "unknown study.pair_types"),
    ("study.align_restarts=0", "study.align_restarts must be a positive integer, got 0"),
    ("align=activation_matching", "study=star aligns each pair by weight matching"),
    ("data_seeds=[3,4]", "data_seeds and aug_seeds are not read"),
    ("+study.bogus=1", "unknown key study.bogus"),
    ("model=soft_trees", "model soft_trees declares its own symmetry"),
])
def test_bad_study_settings_are_one_line_before_anything_runs(override, message, tmp_path, data_root):
    with pytest.raises(ConfigError) as info:
        in_process(tmp_path, data_root, ["study=star", override, f"store.root={tmp_path / 'store'}", "logger=none"],
                   "out")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "store").exists()


def test_bad_input_on_the_command_line_exits_2_with_one_line(tmp_path, data_root):
    proc = lmc_run(["study=star", "study.held_out=[0,7]", f"store.root={tmp_path / 's'}", "logger=none"], tmp_path,
                   data_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: study.held_out repeats anchor seeds [0]: a held-out model "
                                                "must be one the star model never saw; choose other seeds"]


def test_star_identity_leaves_out_what_its_settings_switch_off():
    off = star_identity(StarConfig())
    assert "t_constant" not in off and "sinkhorn_lr" not in off and "permute_every" not in off
    assert off["t_sampling"] == "uniform" and off["permute_anchors"] == "off"
    wm = star_identity(StarConfig(permute_anchors="weight_matching", permute_every=2))
    assert wm["permute_every"] == 2 and wm["align_max_iter"] == 100 and "sinkhorn_steps" not in wm
    sinkhorn = star_identity(StarConfig(permute_anchors="sinkhorn", t_sampling="constant", t_constant=0.3))
    assert sinkhorn["sinkhorn_steps"] == 200 and sinkhorn["t_constant"] == 0.3 and "align_max_iter" not in sinkhorn
    assert Star.name == "star"
