"""Bad input and faults: one clear line naming the bad value (or path), non-zero exit, no traceback,
earlier results untouched."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import TINY, lmc_run

from lmc.core.alignment import align
from lmc.core.models import build_model
from lmc.core.permutation import permutation_spec
from lmc.errors import ConfigError
from lmc.run import CONF_DIR, run

QUICK = [*TINY, "interp.layerwise=false", "logger=none"]


def one_line_error(proc, code, message):
    assert proc.returncode == code, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


EXPERIMENTS = ", ".join(sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
DATASETS = ("breast_cancer, cifar10, cifar100, digits, fashion_mnist, mnist, mnist1d, mnist1d_tabular, openml, svhn, "
            "table, tensors")


@pytest.mark.parametrize("args,message", [
    (["experiment=foo"], "error: unknown experiment 'foo'; valid: " + EXPERIMENTS),
    (["-m", "experiment=mlp_mnist1d,foo"], "error: unknown experiment 'foo'; valid: " + EXPERIMENTS),
    (["model=transformer"],
     "error: unknown model 'transformer'; valid: cnn1d, mlp, resnet18, resnet20, soft_trees, vgg"),
    (["data=imagenet"], "error: unknown data 'imagenet'; valid: " + DATASETS),
    (["align=magic"], "error: unknown align 'magic'; valid: activation_matching, annealing, none, sinkhorn, ste, "
     "weight_matching"),
    (["seeds=[0,0.5]"], "error: seeds must be 2 distinct integers, e.g. seeds=[0,1]; got [0, 0.5]"),
    (["data_seeds=[3]"], "error: data_seeds must be 2 integers, e.g. data_seeds=[0,1]; got [3]"),
    (["store.on_corrupt=ignore"], "error: unknown store.on_corrupt 'ignore'; valid: error, retrain"),
])
def test_bad_choice_is_one_line(args, message, tmp_path, data_root):
    proc = lmc_run([*args, *QUICK, f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'o'}",
                    f"hydra.sweep.dir={tmp_path / 'm'}"], tmp_path, data_root)
    one_line_error(proc, 2, message)


def compose_run_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["aug_seeds=[1,x]"], "aug_seeds must be 2 integers"),
    (["spawn.step=3", "data_seeds=[4,4]", "aug_seeds=[5,5]"], "spawned children need different data_seeds"),
    (["spawn.step=-1"], "spawn.step must be an integer step in [0, 64]"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be a positive integer (epochs), got 0"),
    (["train.keep_checkpoints=[5xx]"], "bad train.keep_checkpoints entry '5xx'"),
    (["model.width=-3"], "model.width must be a positive integer, got -3"),
    (["train.epochs=0"], "train.epochs must be a positive integer, got 0"),
])
def test_bad_values_raise_config_errors_before_training(overrides, message, tmp_path, data_root):
    cfg = compose_run_cfg([*QUICK, *overrides, f"data.root={data_root}", f"store.root={tmp_path / 'store'}"])
    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "store").glob("models/*/meta.json"))


def test_aligning_different_architectures_is_refused():
    a = build_model("mlp", (8,), 2, width=16, depth=1)
    b = build_model("mlp", (8,), 2, width=32, depth=1)
    spec = permutation_spec(a, torch.zeros(2, 8))
    with pytest.raises(ConfigError, match=r"cannot align models of different architectures: 'fc1.weight' is "
                                          r"\(16, 8\) in model A and \(32, 8\) in model B"):
        align("weight_matching", spec, a, b)
    with pytest.raises(ConfigError, match="different architectures"):
        align("none", spec, a, build_model("mlp", (8,), 2, width=16, depth=2))


def test_corrupted_stored_model_from_the_command_line(tmp_path, data_root):
    args = [*QUICK, f"store.root={tmp_path / 'store'}"]
    assert lmc_run([*args, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, data_root).returncode == 0
    earlier = (tmp_path / "one" / "results.json").read_text()
    h = json.loads(earlier)["store"]["hashes"]["b"]
    model_pt = tmp_path / "store" / "models" / h / "model.pt"
    truncated = model_pt.read_bytes()[:-50]
    model_pt.write_bytes(truncated)
    proc = lmc_run([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, data_root)
    one_line_error(proc, 1, f"error: checkpoint {model_pt} is corrupted or truncated")
    assert "set store.on_corrupt=retrain to retrain it" in proc.stderr
    assert model_pt.read_bytes() == truncated  # reported, not silently replaced
    assert (tmp_path / "one" / "results.json").read_text() == earlier
    fixed = lmc_run([*args, "store.on_corrupt=retrain", f"hydra.run.dir={tmp_path / 'three'}"], tmp_path, data_root)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    redone = json.loads((tmp_path / "three" / "results.json").read_text())
    assert redone["reused"]["a"] and not redone["reused"]["b"]
    assert redone["endpoints"] == json.loads(earlier)["endpoints"]  # retrained bitwise the same


def test_unwritable_store_root_from_the_command_line(tmp_path, data_root):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = lmc_run([*QUICK, f"store.root={blocker / 'store'}", f"hydra.run.dir={tmp_path / 'o'}"], tmp_path,
                   data_root)
    one_line_error(proc, 1, f"error: store.root '{blocker / 'store'}' is not writable (Not a directory)")


def test_missing_dataset_leaves_the_store_untouched(tmp_path, data_root):
    cfg = compose_run_cfg([*QUICK, f"data.root={data_root}", f"store.root={tmp_path / 'store'}"])
    (tmp_path / "first").mkdir()
    run(cfg, tmp_path / "first")
    before = {p: p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}

    # the same store, a dataset that is not on disk (and downloads are off): the real loader's error
    missing = compose_run_cfg([*QUICK, "data=cifar10", f"data.root={tmp_path / 'empty'}",
                               f"store.root={tmp_path / 'store'}"])
    with pytest.raises(ConfigError, match=r"dataset cifar10 not found .*python -m lmc.data download cifar10"):
        run(missing, tmp_path / "second")
    after = {p: p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert after == before


class FailingRun:
    """A W&B run that fails on every call after start, as when the service dies mid-run."""

    def __init__(self):
        self.finished_with = None
        self.summary = self

    def define_metric(self, *a, **k):
        raise ConnectionError("wandb service died")

    log = update = define_metric

    def finish(self, exit_code=0):
        self.finished_with = exit_code


def test_wandb_failing_mid_run_warns_and_keeps_local_files(tmp_path, data_root, monkeypatch):
    import lmc.report.tracking

    runs = []

    def fake_init(self, run_dir, config, project, entity, mode, name=None, group=None, tags=None):
        self._wandb, self.mode, self.run = None, mode, FailingRun()
        runs.append(self.run)

    monkeypatch.setattr(lmc.report.tracking.WandbTracker, "__init__", fake_init)
    cfg = compose_run_cfg([*TINY, "interp.layerwise=false", "logger=wandb", "logger.mode=offline",
                           f"data.root={data_root}", f"store.root={tmp_path / 'store'}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(cfg, tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("W&B curve logging failed (ConnectionError: wandb service died)" in m for m in messages), messages
    assert any("W&B summary failed" in m for m in messages)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "curves.csv").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["barriers"] == results["barriers"]
    assert runs[0].finished_with == 0
    # a run that fails still finishes its W&B run (marked failed)
    monkeypatch.setattr("lmc.stages.alignment.WeightMatching.runs",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    cfg.align.max_iter = 7  # a new alignment setting: not in the store, so align() runs
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg, tmp_path / "failed")
    assert runs[1].finished_with == 1
