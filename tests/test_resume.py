"""Resumable training: checkpoints restore everything, a killed run resumes bitwise, faults are reported."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fake_datasets import tiny_data
from test_cli import lmc_run
from torch import nn

from lmc.core.models import build_model
from lmc.core.training import TrainConfig, TrainingDiverged, seeded_init, train
from lmc.errors import CorruptCheckpoint
from lmc.io import CheckpointDir, load_verified


def new_model():
    return seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=1), 0)


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("stop", [10, 17, 20])  # end of epoch 1 (10 steps/epoch), mid-epoch, end of epoch 2
def test_interrupted_training_resumes_bitwise(tmp_path, stop):
    data, cfg = tiny_data(300), TrainConfig(epochs=4, batch_size=32, lr=1e-2, keep_checkpoints=["15st"])
    reference = new_model()
    ref_history = train(reference, data, cfg, data_seed=3, aug_seed=5, progress=False)
    ckpt = CheckpointDir(tmp_path)
    train(new_model(), data, cfg, data_seed=3, aug_seed=5, progress=False, checkpoints=ckpt, stop_step=stop)
    assert load_verified(ckpt.latest_file())["step"] == stop
    resumed = new_model()
    history = train(resumed, data, cfg, data_seed=3, aug_seed=5, progress=False, checkpoints=ckpt)
    assert same_weights(resumed, reference)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref_history], rel=1e-6)
    # the global RNGs are the caller's again afterwards
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    train(new_model(), data, TrainConfig(epochs=1, batch_size=64), data_seed=0, progress=False)
    assert torch.equal(torch.rand(1), expected)


def test_corrupted_checkpoint_is_detected_with_its_path(tmp_path):
    data, cfg = tiny_data(300), TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    ckpt = CheckpointDir(tmp_path)
    train(new_model(), data, cfg, data_seed=0, progress=False, checkpoints=ckpt, stop_step=10)
    path = ckpt.latest_file()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint {path} is corrupted or truncated"):
        train(new_model(), data, cfg, data_seed=0, progress=False, checkpoints=ckpt)
    path.write_bytes(bytes(raw[:1000]))
    with pytest.raises(CorruptCheckpoint, match=str(path)):
        train(new_model(), data, cfg, data_seed=0, progress=False, checkpoints=ckpt)


class NaNAfter(nn.Module):
    """A linear model whose output becomes NaN from its ``n``-th training forward pass on."""

    def __init__(self, n):
        super().__init__()
        self.lin, self.calls, self.n = nn.Linear(8, 2), 0, n

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                return self.lin(x) * float("nan")
        return self.lin(x)


def test_divergence_reports_the_step_and_keeps_earlier_checkpoints(tmp_path):
    data, cfg = tiny_data(300), TrainConfig(epochs=4, batch_size=32, lr=1e-2)  # 10 steps per epoch
    ckpt = CheckpointDir(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"at step 25 \(epoch 3\)"):
        train(NaNAfter(25), data, cfg, data_seed=0, progress=False, checkpoints=ckpt)
    latest = ckpt.latest()
    assert latest["step"] == 20  # epochs 1 and 2 checkpointed, nothing after the divergence
    assert all(torch.isfinite(v).all() for v in latest["model"].values())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_00000020.pt"]


def test_divergence_from_the_command_line(tmp_path, data_root):
    proc = lmc_run(["model.width=16", "model.depth=1", "train.epochs=2", "train.optimizer=sgd", "train.lr=1e12",
                    "logger=none", "progress=false", f"store.root={tmp_path / 'store'}",
                    f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, data_root)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: training loss became nan at step ") and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not list((tmp_path / "store" / "models").glob("*/meta.json"))  # no model stored
    assert (tmp_path / "o" / "error.txt").read_text().startswith("error: training loss became nan")


KILL_RUN = ["model.width=64", "model.depth=1", "train.epochs=4", "train.batch_size=8", "align=none",
            "interp.num_alphas=2", "interp.layerwise=false", "logger=none", "progress=false"]


def test_killed_run_resumes_to_identical_weights(tmp_path, data_root):
    """SIGKILL a real run once its first checkpoint exists, run the same command again, and compare the
    stored weights bitwise with an uninterrupted run."""
    store = tmp_path / "store"
    args = [*KILL_RUN, f"store.root={store}", f"hydra.run.dir={tmp_path / 'killed'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "DATA_DIR": str(data_root)}
    proc = subprocess.Popen([sys.executable, "-m", "lmc.run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(store.glob("models/*/checkpoints/latest.json")):
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_model = next(store.glob("models/*/checkpoints/latest.json")).parent.parent
    assert not (killed_model / "meta.json").exists(), "the run finished before it was killed; make it longer"
    step = json.loads((killed_model / "checkpoints" / "latest.json").read_text())["step"]
    assert 0 < step < 4 * 500

    again = lmc_run(args, tmp_path, data_root)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {killed_model} from step_{step:08d}.pt" in again.stdout

    clean = lmc_run([*KILL_RUN, f"store.root={tmp_path / 'clean'}", f"hydra.run.dir={tmp_path / 'clean_run'}"],
                    tmp_path, data_root)
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed, uninterrupted = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("killed", "clean_run"))
    assert resumed["store"]["hashes"] == uninterrupted["store"]["hashes"]
    for tag in ("a", "b"):
        h = resumed["store"]["hashes"][tag]
        sd1 = torch.load(store / "models" / h / "model.pt")["model"]
        sd2 = torch.load(tmp_path / "clean" / "models" / h / "model.pt")["model"]
        assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1), tag
    assert resumed["endpoints"] == uninterrupted["endpoints"]
