"""``train.stop_loss``: training stops after the first epoch whose mean training loss is below it (Entezari
et al.'s trainer), records it, and resumes correctly."""

import pytest
import torch
from fake_datasets import tiny_data

from lmc.core.models import build_model
from lmc.core.training import TrainConfig, seeded_init, train
from lmc.errors import ConfigError
from lmc.io import CheckpointDir

STEPS_PER_EPOCH = 10  # 300 examples, batch 32


def new_model():
    return seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=1), 0)


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def config(**kw):
    return TrainConfig(epochs=8, batch_size=32, lr=1e-2, **kw)


@pytest.fixture(scope="module")
def full_run():
    """The run without a threshold: its per-epoch losses, and the epoch a threshold between the losses of
    epochs 3 and 4 (both below all earlier ones) first stops at."""
    history = train(new_model(), tiny_data(300), config(), data_seed=3, progress=False)
    losses = [h["loss"] for h in history]
    assert losses[3] < min(losses[:3])  # the loss still falls early on: a threshold can land between epochs
    threshold = (losses[3] + min(losses[:3])) / 2
    first_below = next(i for i, loss in enumerate(losses) if loss < threshold)
    return losses, threshold, first_below


def test_stop_loss_stops_at_the_first_epoch_below_it(full_run):
    losses, threshold, first_below = full_run
    data = tiny_data(300)
    model = new_model()
    history = train(model, data, config(stop_loss=threshold), data_seed=3, progress=False)
    assert [h["epoch"] for h in history] == list(range(1, first_below + 2))
    assert [h["loss"] for h in history] == losses[: first_below + 1]  # the same training up to the stop
    assert history[-1]["loss"] < threshold <= min(h["loss"] for h in history[:-1])
    assert history[-1]["stopped"] is True and not any(h.get("stopped") for h in history[:-1])
    # the weights are those of the unthresholded run after that many epochs (its lr schedule has the same horizon)
    same_steps = new_model()
    train(same_steps, data, config(), data_seed=3, progress=False, stop_step=(first_below + 1) * STEPS_PER_EPOCH)
    assert same_weights(model, same_steps)


def test_a_threshold_never_reached_trains_every_epoch(full_run):
    losses, _, _ = full_run
    history = train(new_model(), tiny_data(300), config(stop_loss=min(losses) / 2), data_seed=3, progress=False)
    assert [h["loss"] for h in history] == losses and not any(h.get("stopped") for h in history)


def test_resuming_a_stopped_run_trains_no_further(full_run, tmp_path):
    _, threshold, first_below = full_run
    data, cfg = tiny_data(300), config(stop_loss=threshold)
    stopped = new_model()
    first = train(stopped, data, cfg, data_seed=3, progress=False, checkpoints=CheckpointDir(tmp_path))
    again = new_model()
    second = train(again, data, cfg, data_seed=3, progress=False, checkpoints=CheckpointDir(tmp_path))
    assert second == first and len(second) == first_below + 1
    assert same_weights(again, stopped)


def test_a_run_interrupted_before_its_stop_resumes_to_the_same_stop(full_run, tmp_path):
    _, threshold, first_below = full_run
    data, cfg = tiny_data(300), config(stop_loss=threshold)
    reference = new_model()
    ref_history = train(reference, data, cfg, data_seed=3, progress=False)
    ckpt = CheckpointDir(tmp_path)
    train(new_model(), data, cfg, data_seed=3, progress=False, checkpoints=ckpt, stop_step=STEPS_PER_EPOCH + 5)
    resumed = new_model()
    history = train(resumed, data, cfg, data_seed=3, progress=False, checkpoints=ckpt)
    # an epoch's mean loss is summed in two parts across the interruption: equal up to rounding
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref_history], rel=1e-6)
    assert [(h["epoch"], h.get("stopped")) for h in history] == [(h["epoch"], h.get("stopped")) for h in ref_history]
    assert len(history) == first_below + 1
    assert same_weights(resumed, reference)


@pytest.mark.parametrize("bad", [0, -0.5])
def test_a_non_positive_stop_loss_is_refused(bad):
    with pytest.raises(ConfigError, match=f"train.stop_loss must be positive .*got {bad}"):
        TrainConfig(stop_loss=bad)
