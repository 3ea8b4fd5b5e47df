"""Every vision experiment config runs end to end (in process, Hydra compose + lmc.run.run) on tiny
fabricated datasets in the real on-disk formats; a missing dataset is one line and exit status 2."""

import os
import subprocess
import sys

import pytest
from fake_datasets import fabricate, skip_md5_checks
from hydra import compose, initialize_config_dir

from lmc.io import read_curves
from lmc.run import CONF_DIR, run

TINY = ["train.epochs=1", "interp.num_alphas=3", "interp.stat_batches=2", "interp.stat_batch_size=16",
        "logger=none", "device=cpu", "progress=false"]
EXPERIMENTS = {
    "mlp_mnist": ("mnist", ["model.width=8", "model.depth=2"]),
    "mlp_fashion_mnist": ("fashion_mnist", ["model.width=8", "model.depth=1", "interp.repair=true"]),
    "vgg_cifar": ("cifar10", ["model.depth=11", "model.base_channels=2", "interp.layerwise=false"]),
    "resnet_cifar": ("cifar10", ["model.width=1", "model.base_channels=2", "model.norm=batchnorm",
                                 "interp.repair=true", "interp.layerwise=false"]),
    "resnet_cifar_split": ("cifar100", ["model.width=1", "model.base_channels=2", "interp.layerwise=false"]),
}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_data")
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        fabricate(name, root, n_train=200, n_test=40)
    return root


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_runs_end_to_end_on_fake_data(experiment, fake_root, tmp_path, monkeypatch, capsys):
    skip_md5_checks(monkeypatch)
    dataset, extra = EXPERIMENTS[experiment]
    cfg = compose_cfg([f"experiment={experiment}", f"data.root={fake_root}", *TINY, *extra])
    assert cfg.name == experiment and cfg.data.name == dataset
    results = run(cfg, tmp_path)
    norm = results["normalization"]
    suffix = "+reset_bn" * norm["reset_bn"] + "+repair" * norm["repair"]
    assert set(results["barriers"]) == {"naive" + suffix, "weight_matching" + suffix}
    assert norm["repair"] == ("interp.repair=true" in extra)
    assert norm["reset_bn"] == ("model.norm=batchnorm" in extra)  # auto: only BatchNorm models
    for tag in "ab":
        assert 0 <= results["endpoints"][tag]["test"]["acc"] <= 1
    rows = read_curves(tmp_path)
    whole = [r for r in rows if not r["layer"]]
    assert {r["method"] for r in whole} == set(results["barriers"]) and len(whole) == 2 * 2 * 3
    if results["layerwise"]:  # layer-wise sweeps get the BatchNorm reset only, never REPAIR
        assert set(results["layerwise"]) == {"naive" + "+reset_bn" * norm["reset_bn"],
                                             "weight_matching" + "+reset_bn" * norm["reset_bn"]}


def test_split_experiment_trains_each_model_on_its_own_classes(fake_root, monkeypatch):
    skip_md5_checks(monkeypatch)
    from lmc.core.data import from_options, split_pair

    cfg = compose_cfg(["experiment=resnet_cifar_split", f"data.root={fake_root}"])
    data = from_options(cfg.data)
    a, b = split_pair(data, cfg.data.split, cfg.data.split_fraction, cfg.data.split_seed)
    assert len(a.y_train) + len(b.y_train) == 200 and len(a.y_test) == len(b.y_test) == 40
    assert (a.y_train < 50).float().mean() == pytest.approx(0.8, abs=0.02)
    assert (b.y_train >= 50).float().mean() == pytest.approx(0.8, abs=0.02)


def test_missing_dataset_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "lmc.run", "experiment=resnet_cifar", f"data.root={tmp_path}",
                           "logger=none", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: dataset cifar10 not found") and proc.stderr.count("\n") == 1
    assert "python -m lmc.data download cifar10" in proc.stderr and "Traceback" not in proc.stderr


def test_width_sweep_of_resnet_cifar_runs_through_hydra(fake_root, tmp_path):
    """`python -m lmc.run -m sweep=width experiment=resnet_cifar` as typed, on the fabricated CIFAR-10 (the
    md5 check is bypassed in the subprocess by a test-only sitecustomize), two tiny widths."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nimport torchvision.datasets.cifar as cifar\n"
        "cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)\n")
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "lmc.run", "-m", "sweep=width", "experiment=resnet_cifar", "model.width=1,2",
         "model.base_channels=2", *TINY, "interp.layerwise=false", f"data.root={fake_root}",
         f"store.root={tmp_path / 'store'}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = [json.loads((sweep_dir / job / "results.json").read_text()) for job in "01"]
    assert [r["experiment"] for r in results] == ["resnet_cifar"] * 2
    assert [r["config"]["model"]["width"] for r in results] == [1, 2]
    assert all(r["config"]["data"]["name"] == "cifar10" and r["config"]["model"]["name"] == "resnet20" for r in results)
    for r in results:
        for tag in "ab":
            assert 0 <= r["endpoints"][tag]["test"]["acc"] <= 1 and r["endpoints"][tag]["test"]["loss"] > 0
