"""Sweeps: presets, launchers (basic, submitit local, slurm config), failed jobs, collection."""

import csv
import json
import os
import subprocess
import sys

import cloudpickle
import pytest
from omegaconf import OmegaConf
from test_cli import lmc_run
from test_config import compose_cfg

from lmc.report.sweep import collect

FAST = ["model.depth=1", "train.epochs=1", "interp.num_alphas=3", "interp.layerwise=false", "progress=false",
        "logger=none"]
# four jobs, the second one invalid (width 0): it fails, the other three complete
FOUR_JOBS_ONE_BAD = "model.width=8,0,16,24"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_four_jobs_one_failed(sweep_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmc.collect", str(sweep_dir), "-o", str(tmp_path / "t.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "4 jobs (3 ok, 1 failed)" in proc.stdout
    rows = read_csv(tmp_path / "t.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert "model.width=0" in rows[1]["overrides"]
    assert rows[1]["error"] == "model.width must be a positive integer, got 0"
    for r in (rows[0], rows[2], rows[3]):
        assert r["experiment"] == "mlp_mnist1d" and r["seeds"] == "0 1"
        assert 0 <= float(r["endpoint/a/test/acc"]) <= 1
        assert float(r["barrier/naive/test/loss"]) >= -1e-6
        assert r["hash/a"] and r["error"] == ""
    assert len({r["hash/a"] for r in (rows[0], rows[2], rows[3])}) == 3  # three widths, three models
    return rows


def test_basic_launcher_sweep_survives_a_failed_job(tmp_path, data_root):
    sweep_dir = tmp_path / "sweep"
    proc = lmc_run(["-m", FOUR_JOBS_ONE_BAD, *FAST, f"store.root={tmp_path / 'store'}",
                    f"hydra.sweep.dir={sweep_dir}"], tmp_path, data_root)
    assert proc.returncode == 1  # the sweep reports its failed job at the end
    assert "error: model.width must be a positive integer, got 0" in proc.stderr
    assert f"error: 1 job(s) failed: {sweep_dir / '1'}" in proc.stderr
    rows = check_four_jobs_one_failed(sweep_dir, tmp_path)
    check_sweep_figure(sweep_dir, rows)


def check_sweep_figure(sweep_dir, rows):
    """The barrier-vs-width figure is rebuilt from the jobs' results.json alone; failed jobs are left out."""
    from lmc.report.sweep import sweep_points

    points = sweep_points(sweep_dir, "model.width")
    ok = {int(r["overrides"].split("model.width=")[1].split()[0]): r for r in rows if r["status"] == "ok"}
    assert sorted({p["x"] for p in points}) == sorted(ok) == [8, 16, 24]
    for p in points:
        assert p["loss"] == pytest.approx(float(ok[p["x"]][f"barrier/{p['method']}/{p['split']}/loss"]), rel=1e-12)
    assert {p["method"] for p in points} == {"naive", "weight_matching"}
    proc = subprocess.run([sys.executable, "-m", "lmc.figures", "--sweep", str(sweep_dir), "--x", "model.width"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (sweep_dir / "barrier_vs_model.width.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "lmc.figures", "--sweep", str(sweep_dir), "--x", "model.colour"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "has no setting 'model.colour'" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_local_cluster_sweep_survives_a_failed_job(tmp_path, data_root):
    """cluster=local: four jobs in parallel processes (submitit_local); about 13 s on 2 cores."""
    sweep_dir = tmp_path / "sweep"
    proc = lmc_run(["-m", "cluster=local", FOUR_JOBS_ONE_BAD, *FAST, f"store.root={tmp_path / 'store'}",
                    f"hydra.sweep.dir={sweep_dir}"], tmp_path, data_root, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: 1 job(s) failed: {sweep_dir / '1'}" in proc.stderr
    assert (sweep_dir / ".submitit").is_dir()  # really ran through submitit
    check_four_jobs_one_failed(sweep_dir, tmp_path)


def test_width_sweep_sweeps_only_the_width(tmp_path, data_root):
    cfg = compose_cfg(["sweep=width"])
    assert dict(cfg.hydra.sweeper.params) == {"model.width": "1,2,4,8,16"}
    sweep_dir = tmp_path / "sweep"
    proc = lmc_run(["-m", "sweep=width", "model.width=4,12", *FAST, f"store.root={tmp_path / 'store'}",
                    f"hydra.sweep.dir={sweep_dir}"], tmp_path, data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    widths = [json.loads((sweep_dir / j / "results.json").read_text())["config"]["model"]["width"] for j in "01"]
    assert widths == [4, 12]


@pytest.mark.parametrize("sweep,key,values", [
    ("align_method", "align", "none,weight_matching,activation_matching,ste,sinkhorn"),
    ("spawn_step", "spawn.step", "0,8,32,128,512"),
    ("seeds", "seeds", "[0,1],[2,3],[4,5]"),
])
def test_sweep_presets(sweep, key, values):
    cfg = compose_cfg([f"sweep={sweep}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and dict(cfg.hydra.sweeper.params) == {key: values}


def test_cluster_configs_compose():
    local = compose_cfg(["cluster=local"]).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.cpus_per_task == 1
    slurm = compose_cfg(["cluster=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert slurm.partition == "gpu" and slurm.gpus_per_node == 1 and slurm.mem_gb == 32
    assert slurm.timeout_min == 240 and slurm.cpus_per_task == 8 and slurm.max_num_timeout > 0
    assert compose_cfg().hydra.launcher._target_.endswith("BasicLauncher")


def test_slurm_job_is_picklable():
    """What submitit pickles for every job: the launcher holding the task function and the config."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.utils import JobReturn  # noqa: F401 - the job's return type must import on the node
    from hydra.types import HydraContext
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    from lmc.run import CONF_DIR, main

    cfg = compose_cfg(["cluster=slurm", "hydra.launcher.partition=gpu"])
    params = {k: v for k, v in OmegaConf.to_container(cfg.hydra.launcher, resolve=False).items() if k != "_target_"}
    launcher = SlurmLauncher(**params)
    from hydra._internal.callbacks import Callbacks

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONF_DIR))
    launcher.setup(hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()), task_function=main,
                   config=cfg)
    clone = cloudpickle.loads(cloudpickle.dumps(launcher))
    assert clone.params["partition"] == "gpu" and clone.config.hydra.launcher.mem_gb == 32
    assert callable(clone.task_function) and clone.task_function.__module__ == "lmc.run"
    assert OmegaConf.to_container(clone.config, resolve=False) == OmegaConf.to_container(cfg, resolve=False)


def test_collect_lists_failed_and_broken_jobs(tmp_path):
    def job(name, overrides, **files):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        for fname, text in files.items():
            (d / fname.replace("_", ".")).write_text(text)

    results = {"experiment": "x", "seeds": [0, 1], "endpoints": {"a": {"test": {"acc": 0.5}}},
               "barriers": {"naive": {"test": {"loss": 0.25}}}, "timings": {"train": 1.5}}
    job("0", ["seeds=[0,1]"], results_json=json.dumps(results))
    job("1", ["seeds=[2,3]"], error_txt="error: training loss became nan at step 7 (epoch 1); lower train.lr?\n")
    job("2", ["seeds=[4,5]"], run_log="[INFO] start\n[ERROR] CUDA out of memory\n")
    job("3", ["seeds=[6,7]"], results_json="{not json")
    job("10", ["seeds=[8,9]"])
    rows = collect(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]
    assert rows[0]["status"] == "ok" and rows[0]["barrier/naive/test/loss"] == 0.25 and rows[0]["seeds"] == "0 1"
    assert rows[1] == {"job": "1", "overrides": "seeds=[2,3]", "status": "failed",
                       "error": "training loss became nan at step 7 (epoch 1); lower train.lr?"}
    assert rows[2]["error"] == "[ERROR] CUDA out of memory"
    assert rows[3]["error"] == "results.json unreadable (JSONDecodeError)"
    assert rows[4]["error"] == "no results.json (job did not finish)"
    bad = subprocess.run([sys.executable, "-m", "lmc.collect", str(tmp_path / "nope")], capture_output=True, text=True,
                         env={**os.environ})
    assert bad.returncode == 2 and "error: sweep directory" in bad.stderr
