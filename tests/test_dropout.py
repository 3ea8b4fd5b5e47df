"""Dropout stability and the piecewise-linear path between two dropout-stable networks (Shevchenko & Mondelli)."""

import pytest
import torch
from fake_datasets import tiny_data
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lmc.core.dropout import compare_paths, drop_units, dropout_path, dropout_stability, hidden_groups, random_kept
from lmc.core.interpolation import lerp_state
from lmc.core.models import build_model
from lmc.core.permutation import permutation_spec
from lmc.core.training import TrainConfig, evaluate, seeded_init, train
from lmc.errors import ConfigError


def _mlp(width=4, depth=1, seed=0):
    return seeded_init(lambda: build_model("mlp", (8,), 2, width=width, depth=depth), seed)


def test_dropping_units_zeroes_and_rescales_their_outgoing_weights_only():
    model = _mlp(width=4)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    spec = permutation_spec(model, torch.zeros(2, 8))
    sd = model.state_dict()
    dropped = drop_units(spec, sd, {"P_fc1": torch.tensor([True, False, True, False])})
    assert torch.equal(dropped["head.weight"], torch.tensor([[2.0, 0.0, 6.0, 0.0], [10.0, 0.0, 14.0, 0.0]]))
    for key in ("fc1.weight", "fc1.bias", "head.bias"):  # incoming weights, biases: the units' own
        assert torch.equal(dropped[key], sd[key])
    three = drop_units(spec, sd, {"P_fc1": torch.tensor([True, True, True, False])})
    assert torch.allclose(three["head.weight"][0], torch.tensor([4 / 3, 8 / 3, 4.0, 0.0]))


def test_dropout_through_flatten_scales_each_channel_block():
    """A CNN's channels are units too; the head reads each channel as a block of positions."""
    model = seeded_init(lambda: build_model("cnn1d", (6,), 2, width=3, depth=1), 0)
    spec = permutation_spec(model, torch.zeros(2, 6))
    sd = model.state_dict()
    dropped = drop_units(spec, sd, {"P_conv1": torch.tensor([False, True, False])})
    blocks = sd["head.weight"].view(2, 3, 3)  # (classes, channels, positions)
    expected = torch.zeros_like(blocks)
    expected[:, 1] = 3 * blocks[:, 1]
    assert torch.allclose(dropped["head.weight"], expected.view(2, 9))
    assert torch.equal(dropped["conv1.weight"], sd["conv1.weight"])


def test_dropout_stability_with_p_one_is_exactly_zero():
    data = tiny_data(200)
    model = _mlp(width=16, depth=2)
    spec = permutation_spec(model, data.x_train[:2])
    st = dropout_stability(model, spec, model.state_dict(), data.x_train, data.y_train, p=1.0, samples=3)
    assert st.loss_gap == 0.0 and st.error_gap == 0.0
    assert st.dropped_loss == [st.loss] * 3


def test_dropout_stability_of_a_network_of_identical_units_is_zero():
    """Every hidden unit the same: any half, doubled, computes the same function."""
    model = _mlp(width=8)
    with torch.no_grad():
        model.fc1.weight.copy_(torch.linspace(-1, 1, 8).expand(8, 8))
        model.fc1.bias.fill_(0.25)
        model.head.weight.copy_(torch.tensor([[0.5], [-0.5]]).expand(2, 8))
    data = tiny_data(200)
    spec = permutation_spec(model, data.x_train[:2])
    st = dropout_stability(model, spec, model.state_dict(), data.x_train, data.y_train, p=0.5, samples=4, seed=1)
    assert st.loss_gap == pytest.approx(0.0, abs=1e-6) and st.error_gap == 0.0
    assert st.loss > 0.1  # a real loss, not a degenerate model


def test_random_kept_is_seeded_and_keeps_round_p_n():
    spec = permutation_spec(_mlp(width=10, depth=2), torch.zeros(2, 8))
    kept = random_kept(spec, 0.3, torch.Generator().manual_seed(0))
    again = random_kept(spec, 0.3, torch.Generator().manual_seed(0))
    assert {g: int(m.sum()) for g, m in kept.items()} == {"P_fc1": 3, "P_fc2": 3}
    assert all(torch.equal(kept[g], again[g]) for g in kept)
    with pytest.raises(ConfigError, match="keep fraction p must be in \\(0, 1\\], got 0"):
        random_kept(spec, 0, torch.Generator())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.head(h + F.relu(self.fc2(h)))


def test_a_residual_stream_is_refused():
    model = Residual()
    spec = permutation_spec(model, torch.zeros(2, 8))
    with pytest.raises(ConfigError, match="group P_fc1 is written by 2 weights \\(fc1.weight, fc2.weight\\)"):
        hidden_groups(spec, model.state_dict())


@pytest.fixture(scope="module")
def trained_pair():
    """Two one-hidden-layer MLPs (width 16) trained from different seeds on the tiny task."""
    data = tiny_data(300)
    models = []
    for seed in (0, 1):
        model = _mlp(width=16, seed=seed)
        train(model, data, TrainConfig(epochs=5, batch_size=32, lr=1e-2), data_seed=seed, progress=False)
        models.append(model)
    return data, models, permutation_spec(models[0], data.x_train[:2])


def _logits(model, state, x):
    with torch.no_grad():
        return functional_call(model, state, (x,))


def test_the_dropout_path_runs_from_a_to_b_through_their_dropout_networks(trained_pair):
    data, (model_a, model_b), spec = trained_pair
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    corners = dropout_path(spec, sd_a, sd_b, seed=3)
    assert len(corners) == 6
    assert all(torch.equal(corners[0][k], v) for k, v in sd_a.items())  # the end points are the two models
    assert all(torch.equal(corners[-1][k], v) for k, v in sd_b.items())
    kept_a = corners[1]["head.weight"][0] != 0  # A keeps half of the units, B the other half
    assert int(kept_a.sum()) == 8 and torch.equal(corners[4]["head.weight"][0] != 0, ~kept_a)
    x = data.x_train
    logits = [_logits(model_a, c, x) for c in corners]
    # corners 2→3 and 4→5 only change units nobody reads: the function is the same, bit for bit
    assert torch.equal(logits[1], logits[2]) and torch.equal(logits[3], logits[4])
    # the other segments are linear in the logits (one hidden layer): the midpoint's logits are the mean
    for i in (0, 2, 4):
        mid = _logits(model_a, lerp_state(corners[i], corners[i + 1], 0.5), x)
        torch.testing.assert_close(mid, 0.5 * (logits[i] + logits[i + 1]), rtol=1e-5, atol=1e-5)


def test_the_dropout_path_loss_stays_below_its_corners(trained_pair):
    """Cross-entropy is convex in the logits, so along the path the loss never exceeds the largest corner."""
    data, (model_a, model_b), spec = trained_pair
    corners = dropout_path(spec, model_a.state_dict(), model_b.state_dict(), seed=3)
    corner_losses = [evaluate(model_a, data.x_train, data.y_train, params=c)[0] for c in corners]
    rows, barriers = compare_paths(model_a, spec, model_a.state_dict(), model_b.state_dict(),
                                   {"train": (data.x_train, data.y_train)}, [0, 0.25, 0.5, 0.75, 1], seed=3)
    path = sorted((r for r in rows if r["method"] == "dropout_path"), key=lambda r: r["alpha"])
    assert [r["alpha"] for r in path] == pytest.approx([i / 20 for i in range(21)])
    assert [r["segment"] for r in path] == [0] * 5 + [s for s in (1, 2, 3, 4) for _ in range(4)]
    assert max(r["loss"] for r in path) <= max(corner_losses) + 1e-6
    assert [r["loss"] for r in path if r["alpha"] * 5 % 1 == 0] == pytest.approx(corner_losses, abs=1e-6)
    linear = sorted((r for r in rows if r["method"] == "linear"), key=lambda r: r["alpha"])
    assert len(linear) == 5 and linear[0]["loss"] == pytest.approx(corner_losses[0])
    excess = barriers["dropout_path"]["train"]["loss_excess"]
    assert excess == pytest.approx(max(corner_losses) - max(corner_losses[0], corner_losses[-1]), abs=1e-6)
    assert set(barriers) == {"linear", "dropout_path"}
    assert set(barriers["linear"]["train"]) == {"loss", "error", "loss_excess", "error_excess"}


def test_the_dropout_path_needs_two_units_per_layer():
    model = _mlp(width=1)
    spec = permutation_spec(model, torch.zeros(2, 8))
    with pytest.raises(ConfigError, match="at least 2 units per hidden layer; group P_fc1 has 1"):
        dropout_path(spec, model.state_dict(), model.state_dict())
