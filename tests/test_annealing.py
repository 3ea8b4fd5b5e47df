"""Simulated annealing (Entezari et al.) against a plain reference, on the oracle pair, and the oracle itself."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import tiny_data
from torch import nn
from torch.nn import functional as F

from lmc.core.models import build_model
from lmc.core.oracle import barrier_removed, permuted_copy, unit_agreement
from lmc.core.permutation import apply_permutation, permutation_spec
from lmc.core.permutation.annealing import anneal, annealing, batch_metric, draw_moves, temperatures
from lmc.core.training import TrainConfig, seeded_init, train
from lmc.errors import ConfigError


def reference_annealing(spec, model, sd_a, sd_b, batches, steps, t_start, t_end, metric, seed):
    """simanneal's ``Annealer.anneal`` with Entezari et al.'s move and energy, written plainly: every proposal
    copies the permutation, rebuilds π(θ_B) with ``apply_permutation`` and the midpoint state dict, and
    evaluates it with ``functional_call``. Same pre-drawn moves and uniforms as :func:`anneal`."""
    temps = temperatures(steps, t_start, t_end)
    moves, uniforms = draw_moves(spec, steps, seed)
    model.eval()
    ends = 0.5 * (batch_metric(model, sd_a, batches, metric) + batch_metric(model, sd_b, batches, metric))

    def energy_of(perm):
        permuted = apply_permutation(spec, perm, sd_b)
        mid = {k: (v + permuted[k]) * 0.5 if v.is_floating_point() else v for k, v in sd_a.items()}
        return batch_metric(model, mid, batches, metric) - ends

    perm = {g: torch.arange(n) for g, n in spec.sizes.items()}
    energy = energy_of(perm)
    best, best_perm = energy, perm
    energies, accepted = [], []
    for step in range(steps):
        new = {g: p.clone() for g, p in perm.items()}
        for gi, g in enumerate(spec.groups):
            a, b = moves[step, gi]
            new[g][a], new[g][b] = perm[g][b], perm[g][a]
        proposed = energy_of(new)
        energies.append(proposed)
        delta = proposed - energy
        accepted.append(not (delta > 0 and math.exp(-delta / temps[step]) < uniforms[step]))
        if accepted[-1]:
            perm, energy = new, proposed
            if energy < best:
                best, best_perm = energy, perm
    return best_perm, best, np.array(energies), np.array(accepted)


class SmallCNN(nn.Module):
    """Conv + BatchNorm, conv, then flatten into a linear head: groups on channels, blocks on the head's inputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.conv2 = nn.Conv1d(4, 3, 3, padding=1)
        self.head = nn.Linear(3 * 8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.head(F.relu(self.conv2(x)).flatten(1))


def _random_bn_stats(model, seed):
    gen = torch.Generator().manual_seed(seed)
    model.bn1.running_mean.copy_(torch.randn(4, generator=gen) * 0.1)
    model.bn1.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    return model


def _pair(kind):
    """Two independently initialised models of one kind, and two fixed batches labelled by the first model
    (so that the error, not only the loss, varies between permutations)."""
    gen = torch.Generator().manual_seed(0)
    if kind == "mlp":
        models = [seeded_init(lambda: build_model("mlp", (12,), 4, width=6, depth=2), s) for s in (0, 1)]
        x = 4 * torch.randn(96, 12, generator=gen)  # large inputs: the midpoint's predictions are not all its bias's
    else:
        models = [_random_bn_stats(seeded_init(SmallCNN, s), s) for s in (0, 1)]
        x = torch.randn(96, 1, 8, generator=gen)
    with torch.no_grad():
        y = models[0].eval()(x).argmax(1)
    models[0].train()
    spec = permutation_spec(models[0], x[:2])
    return spec, models[0], models[0].state_dict(), models[1].state_dict(), [(x[:48], y[:48]), (x[48:], y[48:])]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("metric,t_start,t_end", [("loss", 0.05, 1e-3), ("error", 0.02, 1e-3)])
def test_annealing_makes_the_reference_decisions(kind, metric, t_start, t_end):
    """The in-place midpoint (one proposal per pass) gives the reference's energies bit for bit, hence its
    decisions and permutation; batched proposals (vmap, adaptive batch size) make the same decisions."""
    spec, model, sd_a, sd_b, batches = _pair(kind)
    steps = 300
    ref_perm, ref_best, ref_energies, ref_accepted = reference_annealing(
        spec, model, sd_a, sd_b, batches, steps, t_start, t_end, metric, seed=4)
    assert 0.1 < ref_accepted.mean() < 0.9  # both branches of the rule are exercised
    model.train()
    one = anneal(spec, model, sd_a, sd_b, batches, steps=steps, t_start=t_start, t_end=t_end, metric=metric, seed=4)
    assert np.array_equal(one.energies, ref_energies)
    assert np.array_equal(one.accepted, ref_accepted)
    assert one.energy == ref_best and one.evaluations == steps
    assert all(torch.equal(one.permutation[g], ref_perm[g]) for g in spec.groups)
    many = anneal(spec, model, sd_a, sd_b, batches, steps=steps, t_start=t_start, t_end=t_end, metric=metric, seed=4,
                  proposals=8)
    assert np.array_equal(many.accepted, ref_accepted)
    np.testing.assert_allclose(many.energies, ref_energies, rtol=0, atol=1e-7)  # energies are differences of ~1 losses
    assert all(torch.equal(many.permutation[g], ref_perm[g]) for g in spec.groups)
    assert many.evaluations > steps  # some speculative proposals were dropped after an acceptance
    # the caller's model is untouched and keeps its mode
    assert model.training and all(torch.equal(v, sd_a[k]) for k, v in model.state_dict().items())


def _trained_tiny_mlp():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=gen)
    y = (x @ torch.randn(12, 4, generator=gen)).argmax(1)
    model = seeded_init(lambda: build_model("mlp", (12,), 4, width=6, depth=2), 1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_annealing_recovers_the_planted_permutation_of_an_oracle_pair():
    """B is a permutation of a trained A: annealing on the midpoint loss reaches zero barrier and the answer."""
    model, x, y = _trained_tiny_mlp()
    spec = permutation_spec(model, x[:2])
    sd_a = model.state_dict()
    sd_b, answer = permuted_copy(spec, sd_a, seed=5)
    naive = anneal(spec, model, sd_a, sd_b, [(x, y)], steps=1, t_start=1.0, t_end=0.5, metric="loss").initial_energy
    assert naive > 0.3  # the unaligned pair has a real barrier
    found = anneal(spec, model, sd_a, sd_b, [(x, y)], steps=5000, t_start=0.3, t_end=1e-4, metric="loss", seed=0)
    assert abs(found.energy) < 1e-6
    assert unit_agreement(found.permutation, answer) == {g: 1.0 for g in [*spec.groups, "all"]}
    aligned = apply_permutation(spec, found.permutation, sd_b)
    assert all(torch.equal(aligned[k], v) for k, v in sd_a.items())
    assert barrier_removed(naive, found.energy) == pytest.approx(1.0)
    # the plain entry point returns anneal's permutation
    short = dict(steps=200, t_start=0.3, t_end=1e-4, metric="loss", seed=1)
    again = annealing(spec, model, sd_a, sd_b, [(x, y)], **short)
    assert all(torch.equal(again[g], anneal(spec, model, sd_a, sd_b, [(x, y)], **short).permutation[g])
               for g in spec.groups)


def test_annealing_starts_from_init_and_returns_the_best_state_seen():
    """With ``init`` at the planted answer and a hot schedule, every state visited is worse: the start is returned."""
    model, x, y = _trained_tiny_mlp()
    spec = permutation_spec(model, x[:2])
    sd_b, answer = permuted_copy(spec, model.state_dict(), seed=5)
    hot = anneal(spec, model, model.state_dict(), sd_b, [(x, y)], steps=50, t_start=100.0, t_end=10.0, metric="loss",
                 init=answer)
    assert hot.accepted.mean() > 0.9 and hot.energies.min() > hot.initial_energy
    assert hot.energy == hot.initial_energy
    assert all(torch.equal(hot.permutation[g], answer[g]) for g in spec.groups)


def test_temperatures_follow_simanneal():
    t = temperatures(4, 100.0, 1.0)
    np.testing.assert_allclose(t, [100 * 0.01 ** (s / 4) for s in (1, 2, 3, 4)], rtol=1e-12)
    np.testing.assert_allclose(temperatures(4, 1.0, 0.2, "linear"), [0.8, 0.6, 0.4, 0.2], rtol=1e-12)


def test_moves_are_seeded_and_within_each_group():
    spec, *_ = _pair("cnn")
    moves, uniforms = draw_moves(spec, 200, seed=3)
    again, _ = draw_moves(spec, 200, seed=3)
    assert np.array_equal(moves, again) and not np.array_equal(moves, draw_moves(spec, 200, seed=4)[0])
    assert moves.shape == (200, len(spec.groups), 2) and ((0 <= uniforms) & (uniforms < 1)).all()
    for gi, g in enumerate(spec.groups):
        assert moves[:, gi].max() == spec.sizes[g] - 1 and moves[:, gi].min() == 0


@pytest.mark.parametrize("option,value,message", [
    ("metric", "accuracy", "unknown align.metric 'accuracy'; valid: loss, error"),
    ("schedule", "cosine", "unknown align.schedule 'cosine'; valid: exponential, linear"),
    ("steps", 0, "align.steps must be a positive integer, got 0"),
    ("t_end", 0.0, "align.t_start and align.t_end must be positive, got 250.0 and 0.0"),
    ("proposals", 0, "align.proposals must be a positive integer, got 0"),
])
def test_bad_annealing_options_are_named(option, value, message):
    spec, model, sd_a, sd_b, batches = _pair("mlp")
    with pytest.raises(ConfigError, match=message):
        anneal(spec, model, sd_a, sd_b, batches, **{option: value})


# ------------------------------------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_oracle_b_computes_a_s_function_before_training(kind):
    spec, model, sd_a, _, batches = _pair(kind)
    sd_b, answer = permuted_copy(spec, sd_a, seed=2)
    assert any(not torch.equal(sd_b[k], v) for k, v in sd_a.items())  # B's weights are not A's
    back = apply_permutation(spec, answer, sd_b)
    assert all(torch.equal(back[k], v) for k, v in sd_a.items())  # un-permuting gives A exactly
    model.eval()
    x = batches[0][0]
    out_a = model(x)
    out_b = torch.func.functional_call(model, sd_b, (x,))
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)


def test_the_oracle_pair_stays_a_permutation_through_training():
    """B (A's init, permuted) trained with A's seeds is A permuted, up to float rounding (Adam, 4 epochs)."""
    data = tiny_data(300)
    model_a = seeded_init(lambda: build_model("mlp", (8,), 2, width=16, depth=2), 0)
    spec = permutation_spec(model_a, data.x_train[:2])
    sd_b, answer = permuted_copy(spec, model_a.state_dict(), seed=1)
    model_b = build_model("mlp", (8,), 2, width=16, depth=2)
    model_b.load_state_dict(sd_b)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2)
    train(model_a, data, cfg, data_seed=3, progress=False)
    train(model_b, data, cfg, data_seed=3, progress=False)
    back = apply_permutation(spec, answer, model_b.state_dict())
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=1e-5, atol=1e-6)


def test_unit_agreement_and_barrier_removed_by_hand():
    answer = {"P_a": torch.tensor([0, 1, 2, 3]), "P_b": torch.tensor([1, 0])}
    found = {"P_a": torch.tensor([0, 1, 3, 2]), "P_b": torch.tensor([1, 0])}
    assert unit_agreement(found, answer) == {"P_a": 0.5, "P_b": 1.0, "all": 4 / 6}
    assert barrier_removed(0.4, 0.1) == pytest.approx(0.75)
    assert barrier_removed(0.4, 0.5) == pytest.approx(-0.25)
    assert math.isnan(barrier_removed(0.0, 0.0))
    with pytest.raises(ValueError, match="different groups"):
        unit_agreement({"P_a": answer["P_a"]}, answer)


# ------------------------------------------------------------------------------------------------ benchmark


def test_annealing_benchmark_runs_and_agrees_with_the_plain_annealer():
    script = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "annealing.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("mlp", "cnn"))]
    assert len(rows) >= 3
    for row in rows:
        assert row[-1] == "yes"  # same decisions and permutation as the plain annealer
        assert float(row[-2]) > 0  # a ratio was measured
