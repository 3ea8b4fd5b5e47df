"""End-to-end runs of ``python -m lmc.run`` as users type it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmc.io import CURVE_COLUMNS, read_curves

TINY = ["model.width=16", "model.depth=2", "train.epochs=2", "interp.num_alphas=5", "progress=false"]


def lmc_run(args, tmp_path, data_root, env=None):
    full_env = {**os.environ, "WANDB_MODE": "disabled", "DATA_DIR": str(data_root), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmc.run", *args],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("run")
    run_dir = tmp / "out"
    # Git Re-Basin's start: the weight-matching benchmark below reproduces the run's objective from its endpoints
    proc = lmc_run([*TINY, "logger=none", "align.init=identity", f"hydra.run.dir={run_dir}"], tmp, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_tiny_run_writes_the_contract_files(tiny_run):
    run_dir, proc = tiny_run
    for name in ("results.json", "curves.csv", "curves.png", "layerwise.png"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["experiment"] == "mlp_mnist1d" and results["seeds"] == [0, 1]
    assert results["config"]["model"]["width"] == 16
    assert set(results["barriers"]) == {"naive", "weight_matching"}
    for method in results["barriers"]:
        for split in ("train", "test"):
            b = results["barriers"][method][split]
            assert set(b) == {"loss", "error", "loss_midpoint", "error_midpoint", "loss_frankle", "error_frankle"}
            assert -1e-9 <= b["error"] <= 1
    assert set(results["layerwise"]["weight_matching"]) == {"fc1", "fc2", "head"}
    for split in ("train", "test"):
        for tag in ("a", "b"):
            e = results["endpoints"][tag][split]
            assert e["loss"] > 0 and 0 <= e["acc"] <= 1
    assert set(results["timings"]) >= {"data", "train", "align", "interpolate"}
    diag = results["diagnostics"]["weight_matching"]
    assert diag["l2_after"] < diag["l2_before"] and diag["objective_after"] > diag["objective_before"]
    assert set(diag["layers"]) == {"fc1.weight", "fc2.weight", "head.weight"}
    assert "pairwise" not in results
    # curves: 2 methods × (1 whole + 3 layers) × 2 splits × 5 α
    rows = read_curves(run_dir)
    assert (run_dir / "curves.csv").read_text().splitlines()[0] == ",".join(CURVE_COLUMNS)
    assert len(rows) == 2 * 4 * 2 * 5
    # curve ends are the endpoints, and barriers are recomputable from curves.csv alone
    from lmc.core.barriers import barriers_from_curves
    from lmc.report.tracking import flatten

    ends = {r["alpha"]: r for r in rows if r["method"] == "naive" and not r["layer"] and r["split"] == "test"}
    assert ends[0.0]["loss"] == pytest.approx(results["endpoints"]["a"]["test"]["loss"], rel=1e-5)
    assert ends[1.0]["acc"] == pytest.approx(results["endpoints"]["b"]["test"]["acc"])
    assert flatten("", barriers_from_curves(rows)) == pytest.approx(flatten("", results["barriers"]), abs=1e-12)
    # the summary table is printed
    assert "weight_matching" in proc.stdout and "barriers" in proc.stdout


def test_figures_regenerate_from_stored_files(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run[0], run_dir)
    for png in run_dir.glob("*.png"):
        png.unlink()
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", str(run_dir)], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "layerwise.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "lmc.figures", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_wandb_offline_run_lands_in_run_directory(tmp_path, data_root):
    run_dir = tmp_path / "out"
    proc = lmc_run([*TINY, "interp.layerwise=false", "logger=wandb", f"hydra.run.dir={run_dir}"], tmp_path,
                   data_root, env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "offline run has no data file"
    assert (run_dir / "results.json").is_file()


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.width=0", "model.width must be a positive integer, got 0"),
        ("train.epochs=-1", "train.epochs must be a positive integer, got -1"),
        ("align.method=magic",
         "unknown align.method 'magic'; valid: activation_matching, annealing, none, sinkhorn, ste, weight_matching"),
        ("data.name=imagenet",
         "unknown data.name 'imagenet'; valid: breast_cancer, cifar10, cifar100, digits, fashion_mnist, mnist, "
         "mnist1d, mnist1d_tabular, openml, svhn, table, tensors"),
        ("model.name=transformer",
         "unknown model.name 'transformer'; valid: cnn1d, mlp, resnet18, resnet20, soft_trees, vgg"),
        ("seeds=[1,1]", "seeds must be 2 distinct integers"),
        ("seeds=[1,2,3]", "seeds must be 2 distinct integers"),
        ("seeds=[1,2,3] align.merge=everything",
         "unknown align.merge 'everything'; valid: none, reference, merge_many"),
        ("seeds=[1,1,2] align.merge=reference", "seeds must be at least 2 distinct integers"),
        ("seeds=[1,2,3] align.merge=merge_many align.method=none",
         "align.merge=merge_many needs an alignment method"),
        ("device=tpu", "unknown device 'tpu'; valid: auto, cpu, cuda"),
        ("logger.mode=loud", "unknown logger.mode 'loud'; valid: auto, online, offline, disabled"),
    ],
)
def test_bad_input_is_one_clear_line(override, message, tmp_path, data_root):
    proc = lmc_run([*TINY, *override.split(" "), f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, data_root)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_help_and_cfg_job(tmp_path, data_root):
    help_ = lmc_run(["--help"], tmp_path, data_root)
    assert help_.returncode == 0
    for group in ("data", "model", "train", "align", "interp", "logger", "experiment"):
        assert f"{group}:" in help_.stdout
    cfg = lmc_run(["--cfg", "job", "model.width=7"], tmp_path, data_root)
    assert cfg.returncode == 0 and "width: 7" in cfg.stdout and "name: mlp_mnist1d" in cfg.stdout


def test_three_seeds_merged_report_pairwise_barriers(tmp_path, data_root):
    run_dir = tmp_path / "out"
    proc = lmc_run([*TINY, "train.epochs=1", "seeds=[0,1,2]", "align.merge=merge_many", "interp.layerwise=false",
                    "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["seeds"] == [0, 1, 2]
    pairs = results["pairwise"]
    assert set(pairs) == {"naive", "weight_matching"}
    assert set(pairs["weight_matching"]) == {"0-1", "0-2", "1-2"}
    # the pair (A, B) in A's frame is the pair the main curves interpolate
    for method in ("naive", "weight_matching"):
        for split in ("train", "test"):
            expected = results["barriers"][method][split]["loss"]
            assert pairs[method]["0-1"][split]["loss"] == pytest.approx(expected, abs=1e-6)
    # the pairs with C differ from the naive ones once aligned
    assert pairs["weight_matching"]["1-2"]["test"] != pairs["naive"]["1-2"]["test"]


def _benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python experiments/benchmarks/<script> <args>`` with W&B disabled."""
    path = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / script
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)


def _table(stdout: str, end: int, label: str = "") -> dict[str, list[str]]:
    """The rows of a benchmark's table whose label starts with ``label``: their second column (after the
    26-character label, up to ``end``) -> the fields after it."""
    return {line[26:end].strip(): line[end:].split() for line in stdout.splitlines() if line.startswith(label)}


def test_weight_matching_benchmark_on_a_finished_run(tiny_run, tmp_path):
    """``experiments/benchmarks/weight_matching.py --run DIR`` times lmc (also as on a first call) and the
    reference on the run's trained endpoints; all reach the objective the run itself recorded."""
    run_dir, _ = tiny_run
    proc = _benchmark("weight_matching.py", "--run", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {method: {"seconds": float(fields[0]), "ratio": float(fields[1]), "objective": float(fields[2])}
            for method, fields in _table(proc.stdout, 37).items() if method in ("lmc", "lmc 1st", "reference")}
    recorded = json.loads((run_dir / "results.json").read_text())["diagnostics"]["weight_matching"]
    assert rows["lmc"]["objective"] == pytest.approx(recorded["objective_after"], rel=1e-5)
    assert rows["reference"]["objective"] == pytest.approx(rows["lmc"]["objective"], rel=1e-9)
    assert rows["lmc 1st"]["objective"] == rows["lmc"]["objective"]  # the layouts it rebuilds change nothing
    assert rows["lmc"]["objective"] > recorded["objective_before"]
    assert rows["lmc"]["seconds"] > 0 and rows["reference"]["ratio"] > 0
    assert "fastest alternative" in proc.stdout
    # the reference solves every group on every pass; lmc skips the groups whose costs cannot have changed
    groups, lmc, ref = map(int, re.search(r"(\d+) groups\)\s+\(LAP solves: lmc (\d+), reference (\d+);",
                                          proc.stdout).groups())
    assert ref % groups == 0 and ref >= 2 * groups and groups <= lmc < ref
    bad = _benchmark("weight_matching.py", "--run", str(tmp_path))
    assert bad.returncode == 2 and "not a finished run directory" in bad.stderr


def test_learned_alignment_benchmark_on_a_finished_run(tiny_run):
    """``experiments/benchmarks/learned_alignment.py --run DIR``: lmc's Sinkhorn normalisation gives the
    plain log-domain one's matrices and gradients at every logit spread; Sinkhorn re-basin and the STE run
    both ways on the run's endpoints, and the STE's carried LAP prices leave its permutation unchanged."""
    run_dir, _ = tiny_run
    proc = _benchmark("learned_alignment.py", "--run", str(run_dir), "--steps", "20", "--threads", "1", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks = [block.splitlines() for block in proc.stdout.strip().split("\n\n")]
    table = {int(line.split()[0]): [float(v) for v in line.split()[1:]] for line in blocks[0][1:]}
    assert sorted(table) == [1, 10, 100, 1000]
    for lmc_ms, plain_ms, ratio, dp, dgrad in table.values():
        assert lmc_ms > 0 and ratio == pytest.approx(plain_ms / lmc_ms, rel=0.01, abs=0.01)
        assert dp < 1e-5 and dgrad < 1e-3
    for block, baseline in zip(blocks[1:], ("plain", "cold"), strict=True):
        rows = {fields[0]: [float(v) for v in fields[1:]] for fields in map(str.split, block[2:4])}
        assert set(rows) == {"lmc", baseline} and rows[baseline][1] == 1.0
        assert all(ms > 0 and 0 < loss < 10 for ms, _, loss in rows.values())
        alike, total = map(int, re.search(r"assign alike: (\d+) of (\d+)", block[4]).groups())
        assert total == 16 + 16  # the tiny run's two hidden layers of 16 units
        assert alike == total if baseline == "cold" else 0 <= alike <= total
    bad = _benchmark("learned_alignment.py", "--steps", "0")
    assert bad.returncode == 2 and "--steps 0" in bad.stderr


def test_lap_solves_benchmark_times_the_recorded_assignments():
    """``experiments/benchmarks/lap_solves.py`` replays the LAPs of one weight matching four ways; all
    reach the same optimum (the script exits non-zero otherwise) and each line reports its ratio."""
    proc = _benchmark("lap_solves.py", "--only", "x1 (random)", "--repeat", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout, 42, "ResNet-20 x1 (random)")
    assert set(rows) == {"plain", "prices", "reduced", "prices+reduced"}
    assert rows["plain"][1] == "1.00x"
    assert all(float(fields[0]) > 0 for fields in rows.values())
    solves = {int(fields[2].rstrip(",")) for fields in rows.values()}
    assert len(solves) == 1 and solves.pop() >= 12  # at least one solve per group of ResNet-20's 12
    bad = _benchmark("lap_solves.py", "--only", "nothing")
    assert bad.returncode == 2 and "matches no model pair" in bad.stderr


def test_weight_matching_benchmark_trains_and_caches_its_cifar_pairs(tmp_path):
    """The trained CIFAR-shaped pairs are trained once, kept in ``--cache`` and loaded on the next run:
    both runs report the same objectives, lmc's equal to the reference's."""
    runs = []
    for _ in range(2):
        proc = _benchmark("weight_matching.py", "--only", "x1 (2 steps)", "--cifar-steps", "2",
                          "--cache", str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = _table(proc.stdout, 37, "ResNet-20 x1 (2 steps)")
        runs.append({method: float(rows[method][2]) for method in ("lmc", "reference")})
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and all("resnet20-width1-2steps" in name for name in cached)
    assert runs[0] == runs[1] and runs[0]["lmc"] == pytest.approx(runs[0]["reference"], rel=1e-9)
    # trained weights differ from the random initialisation the random pair starts from
    random = _benchmark("weight_matching.py", "--only", "x1 (random)", "--cache", "")
    lmc_random = float(_table(random.stdout, 37, "ResNet-20 x1 (random)")["lmc"][2])
    assert lmc_random != pytest.approx(runs[0]["lmc"], rel=1e-6)
