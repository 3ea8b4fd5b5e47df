"""Starlight (lmc.core.star): the star objective's gradient, plain training as its t = 0 case, bitwise resume,
anchor re-alignment, and the pair-type evaluation on hand-made models with known barriers."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_datasets import tiny_data
from torch import nn
from torch.nn import functional as F

from lmc.core.data import Dataset
from lmc.core.models import build_model
from lmc.core.normalization import reset_bn_stats
from lmc.core.permutation import apply_permutation, matching_objective, permutation_spec, random_permutation
from lmc.core.star import (
    StarConfig,
    StarEvalConfig,
    StarObjective,
    evaluate_star,
    star_pairs,
    train_star,
)
from lmc.core.training import Objective, TrainConfig, evaluate, seeded_init, train
from lmc.errors import ConfigError
from lmc.io import CheckpointDir, load_verified


def mlp(seed=0, width=16):
    return seeded_init(lambda: build_model("mlp", (8,), 2, width=width, depth=2), seed)


class BNNet(nn.Module):
    """Linear → BatchNorm → ReLU → Linear on 8 features (a tiny model with BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.bn = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def bn_net(seed=0):
    return seeded_init(BNNet, seed)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trained_anchors(build, data, n, epochs=2):
    out = []
    for i in range(n):
        m = build(100 + i)
        train(m, data, TrainConfig(epochs=epochs, batch_size=32, lr=1e-2), data_seed=100 + i, progress=False)
        out.append(m.state_dict())
    return out


# ----------------------------------------------------------------------------------------------
# the step's gradient


@pytest.mark.parametrize("build", [mlp, bn_net], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("mu", [0.0, 0.7])
@pytest.mark.parametrize("sampling", ["uniform", "beta"])
def test_gradient_is_the_scaled_gradient_of_the_interpolated_loss(build, mu, sampling):
    """θ's gradient after one step's backward is (1 − t)·∇L(θ_t) (+ μ·∇L(θ)) / (1 + μ), the interpolated
    network normalising with the batch's statistics; the anchors get none and θ's buffers stay as they were."""
    data = tiny_data(64)
    x, y = data.x_train[:32], data.y_train[:32]
    model = build(0)
    model.train()
    anchors = [build(s).state_dict() for s in (1, 2, 3)]
    for sd in anchors:  # running statistics that would change the output if they were used
        for k, v in sd.items():
            if "running" in k:
                v.add_(3.0)
    buffers = copy.deepcopy(dict(model.named_buffers()))
    gen = torch.Generator().manual_seed(7)
    objective = StarObjective(model, anchors, StarConfig(t_sampling=sampling, mu_star=mu), gen)
    for _ in range(3):  # several draws: each step's own anchor and t
        state = gen.get_state()
        n, t = objective.draw()
        gen.set_state(state)
        assert 0 < t < 1
        model.zero_grad()
        loss = objective.loss(model, x, y, 0.0)
        loss.backward()
        # reference: an ordinary module holding the interpolated weights as leaves, in training mode
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.copy_((1 - t) * dict(model.named_parameters())[name] + t * anchors[n][name])
        ref_loss = F.cross_entropy(ref(x), y)
        grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
        mirror = copy.deepcopy(model)  # θ itself (a copy, so that θ's buffers stay untouched)
        own_loss = F.cross_entropy(mirror(x), y)
        own = torch.autograd.grad(own_loss, list(mirror.parameters()))
        assert loss.item() == pytest.approx(((ref_loss + mu * own_loss) / (1 + mu)).item(), rel=1e-5)
        for p, g, g_own in zip(model.parameters(), grads, own):
            expected = ((1 - t) * g + mu * g_own) / (1 + mu)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
        assert all(not a.requires_grad for a in objective.anchors[n])
        assert same_state(dict(model.named_buffers()), buffers)


def test_draws_follow_their_distributions():
    """Anchors uniformly; t ~ U(0, 1) (variance 1/12), Beta(2, 2) (variance 1/20) or the constant."""
    model = mlp()
    anchors = [mlp(s).state_dict() for s in (1, 2, 3, 4)]
    for sampling, var in (("uniform", 1 / 12), ("beta", 1 / 20)):
        objective = StarObjective(model, anchors, StarConfig(t_sampling=sampling), torch.Generator().manual_seed(0))
        draws = [objective.draw() for _ in range(20000)]
        ts = torch.tensor([t for _, t in draws])
        counts = torch.bincount(torch.tensor([n for n, _ in draws]), minlength=4)
        assert ts.min() >= 0 and ts.max() <= 1
        assert ts.mean().item() == pytest.approx(0.5, abs=0.01)
        assert ts.var().item() == pytest.approx(var, rel=0.05)
        assert (counts - 5000).abs().max() < 250
    constant = StarObjective(model, anchors, StarConfig(t_sampling="constant", t_constant=0.25),
                             torch.Generator().manual_seed(0))
    assert {constant.draw()[1] for _ in range(10)} == {0.25}


# ----------------------------------------------------------------------------------------------
# plain training as the t = 0 case


def test_one_anchor_and_t_zero_trains_exactly_like_a_plain_model():
    data = tiny_data(300)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2, label_smoothing=0.1)
    plain = mlp(0)
    plain_history = train(plain, data, cfg, data_seed=3, aug_seed=4, progress=False)
    star = mlp(0)
    history = train_star(star, [mlp(9).state_dict()], data, cfg, StarConfig(t_sampling="constant", t_constant=0.0),
                         data_seed=3, aug_seed=4, draw_seed=11, progress=False)
    assert same_state(star.state_dict(), plain.state_dict())
    assert history == plain_history
    # any t > 0 moves it elsewhere
    other = mlp(0)
    train_star(other, [mlp(9).state_dict()], data, cfg, StarConfig(t_sampling="constant", t_constant=0.1),
               data_seed=3, aug_seed=4, progress=False)
    assert not torch.equal(other.fc1.weight, plain.fc1.weight)


def test_t_zero_with_batchnorm_same_parameters_and_recomputed_statistics():
    """With BatchNorm the parameters still follow plain training bitwise; the running statistics are the
    ones recomputed on the training set at the end (not plain training's moving averages)."""
    data = tiny_data(300)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2)
    plain = bn_net(0)
    train(plain, data, cfg, data_seed=3, progress=False)
    star = bn_net(0)
    train_star(star, [bn_net(9).state_dict()], data, cfg, StarConfig(t_sampling="constant", t_constant=0.0),
               data_seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(star.parameters(), plain.parameters()))
    batches = [data.x_train[i : i + 32] for i in range(0, 300, 32)]
    expected = reset_bn_stats(plain, plain.state_dict(), batches)
    assert same_state(star.state_dict(), expected)
    assert not torch.equal(star.bn.running_mean, plain.bn.running_mean)


# ----------------------------------------------------------------------------------------------
# resume


class Killed(Exception):
    pass


def kill_after(monkeypatch, calls: int) -> None:
    """The star objective raises on its ``calls + 1``-th step, as a killed process would stop there."""
    original = StarObjective.loss
    count = [0]

    def loss(self, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StarObjective, "loss", loss)


@pytest.mark.parametrize(("stop", "last"), [(14, 10), (24, 20), (27, 25)])
def test_resume_after_a_kill_gives_the_same_star_model(tmp_path, monkeypatch, stop, last):
    """Killed mid-epoch, the run resumes from its last checkpoint (epoch ends; step 25 is kept, inside the
    third epoch, which re-aligns the anchors at its start) and ends bitwise where an uninterrupted one does:
    draws, anchor re-alignments (every 2 epochs), BatchNorm passes and θ's own loss included."""
    data = tiny_data(300)  # 10 steps per epoch
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, keep_checkpoints=["25st"])
    anchors = trained_anchors(bn_net, data, 3)
    star_cfg = StarConfig(mu_star=0.5, permute_anchors="weight_matching", permute_every=2)
    reference = bn_net(0)
    ref_history = train_star(reference, anchors, data, cfg, star_cfg, data_seed=1, draw_seed=2, progress=False)
    ckpt = CheckpointDir(tmp_path)
    with monkeypatch.context() as patch:
        kill_after(patch, stop)
        with pytest.raises(Killed):
            train_star(bn_net(0), anchors, data, cfg, star_cfg, data_seed=1, draw_seed=2, progress=False,
                       checkpoints=ckpt)
    assert load_verified(ckpt.latest_file())["step"] == last
    resumed = bn_net(0)
    history = train_star(resumed, anchors, data, cfg, star_cfg, data_seed=1, draw_seed=2, progress=False,
                         checkpoints=ckpt)
    assert same_state(resumed.state_dict(), reference.state_dict())
    assert history == ref_history
    # another draw seed gives another star model
    other = bn_net(0)
    train_star(other, anchors, data, cfg, star_cfg, data_seed=1, draw_seed=3, progress=False)
    assert not torch.equal(other.fc.weight, reference.fc.weight)


class Recording(Objective):
    """The plain loss; records its epoch hooks, and carries the record through checkpoints."""

    def __init__(self):
        self.calls = []

    def epoch_start(self, epoch):
        self.calls.append(("start", epoch))

    def epoch_end(self, epoch):
        self.calls.append(("end", epoch))

    def state_dict(self):
        return {"calls": list(self.calls)}

    def load_state_dict(self, state):
        self.calls = list(state["calls"])


def test_objective_hooks_run_once_per_epoch_across_a_resume(tmp_path):
    """train's objective hooks: each epoch's start and end once, also when a run resumes mid-epoch (the
    resumed epoch's start already ran); its state comes back from the checkpoint."""
    data, cfg = tiny_data(300), TrainConfig(epochs=3, batch_size=32, lr=1e-2, keep_checkpoints=["15st"])
    expected = [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    whole = Recording()
    train(mlp(), data, cfg, data_seed=0, progress=False, objective=whole)
    assert whole.calls == expected
    ckpt = CheckpointDir(tmp_path)
    first = Recording()
    train(mlp(), data, cfg, data_seed=0, progress=False, checkpoints=ckpt, stop_step=15, objective=first)
    assert first.calls == expected[:3]
    resumed = Recording()
    train(mlp(), data, cfg, data_seed=0, progress=False, checkpoints=ckpt, objective=resumed)
    assert resumed.calls == expected


# ----------------------------------------------------------------------------------------------
# anchor re-alignment


@pytest.mark.parametrize("method", ["weight_matching", "sinkhorn"])
def test_permuted_copies_of_the_star_are_aligned_back_onto_it(method):
    model = mlp(0, width=12)
    spec = permutation_spec(model, torch.randn(2, 8))
    sd = model.state_dict()
    anchors = [apply_permutation(spec, random_permutation(spec, s), sd) for s in (1, 2)]
    objective = StarObjective(model, anchors, StarConfig(permute_anchors=method), torch.Generator(), spec=spec)
    assert not all(torch.equal(a, p) for a, p in zip(objective.anchors[0], model.parameters()))
    objective.epoch_start(0)
    for aligned in objective.anchors:
        assert all(torch.equal(a, p) for a, p in zip(aligned, model.parameters()))
    # the interpolated network is then θ itself whatever t is
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    assert objective.loss(model, x, y, 0.0).item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# evaluation


def constant_data(n=4) -> Dataset:
    x, y = torch.ones(n, 1), torch.zeros(n, dtype=torch.long)
    return Dataset("const", x, y, x.clone(), y.clone(), 2)


def one_unit_mlp(b1: float, w: tuple[float, float], c: tuple[float, float]) -> dict:
    """MLP 1 → 1 → 2 whose hidden unit ignores its input: logits = w·relu(b1) + c."""
    sd = build_model("mlp", (1,), 2, width=1, depth=1).state_dict()
    sd["fc1.weight"].zero_()
    sd["fc1.bias"].fill_(b1)
    sd["head.weight"].copy_(torch.tensor(w).view(2, 1))
    sd["head.bias"].copy_(torch.tensor(c))
    return sd


def test_known_barriers_per_pair_type_and_their_summary():
    """A and B both give logits (k, 0) for label 0, but on the path the hidden unit switches off and the
    logit margin falls to k/2 at α = 1/2: loss barrier log(1 + e^(−k/2)) − log(1 + e^(−k)), error barrier 0.
    A pair of A with itself has barrier 0."""
    k = 4.0
    a = one_unit_mlp(1.0, (k, 0.0), (0.0, 0.0))
    b = one_unit_mlp(-1.0, (0.0, 0.0), (k, 0.0))
    expected = math.log1p(math.exp(-k / 2)) - math.log1p(math.exp(-k))
    model = build_model("mlp", (1,), 2, width=1, depth=1)
    result = evaluate_star(model, [a], [a], [b, a], constant_data())
    barriers = {(p.pair, p.split): p for p in result.pairs}
    for split in ("train", "test"):
        for pair in ("star0-held_out0", "held_out0-held_out1", "anchor0-held_out0"):
            assert barriers[pair, split].loss == pytest.approx(expected, rel=1e-5)
            assert barriers[pair, split].loss_midpoint == pytest.approx(expected, rel=1e-5)
            assert barriers[pair, split].error == 0
        for pair in ("star0-held_out1", "anchor0-held_out1", "star0-anchor0"):
            assert barriers[pair, split].loss == pytest.approx(0, abs=1e-7)
        assert barriers["star0-held_out0", split].first_loss == pytest.approx(math.log1p(math.exp(-k)), rel=1e-5)
        assert barriers["star0-held_out0", split].second_acc == 1.0
    star = result.stat("star_held_out", "train", "loss")
    assert (star.mean, star.std, star.n) == (pytest.approx(expected / 2, rel=1e-5),
                                             pytest.approx(expected / math.sqrt(2), rel=1e-5), 2)
    regular = result.stat("held_out_held_out", "train", "loss")
    assert (regular.mean, regular.std, regular.n) == (pytest.approx(expected, rel=1e-5), 0.0, 1)
    assert result.stat("star_anchor", "test", "loss").mean == pytest.approx(0, abs=1e-7)
    assert result.ratio("train") == pytest.approx(0.5, rel=1e-5)
    assert result.ratio("train", regular="anchor_held_out") == pytest.approx(1.0, rel=1e-5)
    # the curves: one row per pair, split and α, labelled with the pair type and pair
    assert len(result.curves) == 6 * 2 * 11
    mid = [r for r in result.curves if r["pair"] == "held_out0-held_out1" and r["split"] == "train"
           and r["alpha"] == 0.5]
    assert len(mid) == 1 and mid[0]["pair_type"] == "held_out_held_out" and mid[0]["method"] == "weight_matching"
    assert mid[0]["loss"] == pytest.approx(math.log1p(math.exp(-k / 2)), rel=1e-5)
    only = evaluate_star(model, [a], [a], [b, a], constant_data(), StarEvalConfig(pair_types=("star_anchor",)))
    assert {p.pair_type for p in only.pairs} == {"star_anchor"}


def test_second_model_is_aligned_to_the_first():
    """A held-out model that is a permuted copy of the star: barrier 0 once aligned, not without."""
    data = tiny_data(200)
    star = mlp(0, width=24)
    train(star, data, TrainConfig(epochs=3, batch_size=32, lr=1e-2), data_seed=0, progress=False)
    spec = permutation_spec(star, data.x_train[:2])
    permuted = apply_permutation(spec, random_permutation(spec, 5), star.state_dict())
    other = mlp(1, width=24).state_dict()
    cfg = StarEvalConfig(pair_types=("star_held_out",))
    aligned = evaluate_star(star, [star.state_dict()], [], [permuted, other], data, cfg)
    naive = evaluate_star(star, [star.state_dict()], [], [permuted, other], data, StarEvalConfig(
        pair_types=("star_held_out",), align="none"))
    by_pair = {(p.pair, p.split): p for p in aligned.pairs}
    assert by_pair["star0-held_out0", "train"].loss == pytest.approx(0, abs=1e-6)
    assert by_pair["star0-held_out0", "test"].error == pytest.approx(0, abs=1e-9)
    assert {(p.pair, p.split): p for p in naive.pairs}["star0-held_out0", "train"].loss > 0.05
    assert {r["method"] for r in naive.curves} == {"none"}


def test_restarts_keep_the_weight_matching_with_the_highest_objective(monkeypatch):
    """With align_restarts=3 the pair is aligned by the best of weight matching's seeds 4, 5, 6 (by its
    objective); with 1, by seed 4 alone."""
    import lmc.core.star as star_module

    data = tiny_data(64)
    model = mlp(0, width=24)
    spec = permutation_spec(model, data.x_train[:2])
    a, b = model.state_dict(), mlp(1, width=24).state_dict()
    names = [k for k, _ in model.named_parameters()]
    params_a, params_b = {k: a[k] for k in names}, {k: b[k] for k in names}
    # a weight matching whose seed 5 stops after one pass: three different optima to choose from
    original = star_module.weight_matching
    seeds = []

    def recorded(*args, seed, **kwargs):
        seeds.append(seed)
        return original(*args, **{**kwargs, "max_iter": 1 if seed == 5 else kwargs["max_iter"]}, seed=seed)

    monkeypatch.setattr(star_module, "weight_matching", recorded)
    perms = {s: original(spec, params_a, params_b, seed=s, max_iter=1 if s == 5 else 100) for s in (4, 5, 6)}
    objectives = {s: matching_objective(spec, p, params_a, params_b) for s, p in perms.items()}
    best = max(objectives, key=objectives.get)
    for restarts, expected in ((3, best), (1, 4)):
        seeds.clear()
        chosen = star_module.best_matching(spec, params_a, params_b, seed=4, restarts=restarts)
        assert seeds == [4, 5, 6][:restarts]
        assert all(torch.equal(chosen[g], perms[expected][g]) for g in chosen)
    assert len(set(objectives.values())) > 1
    with pytest.raises(ConfigError, match="align_restarts"):
        StarEvalConfig(align_restarts=0)


def test_batchnorm_statistics_are_reset_at_every_alpha():
    """Identical models with meaningless running statistics: barrier 0, and every α is evaluated with the
    statistics recomputed on the training batches (method label ``+reset_bn``)."""
    data = tiny_data(200)
    model = bn_net(0)
    sd = model.state_dict()
    sd["bn.running_mean"].fill_(5.0)
    result = evaluate_star(model, [sd], [sd], [sd], data, StarEvalConfig(stat_batches=2, stat_batch_size=50))
    assert {r["method"] for r in result.curves} == {"weight_matching+reset_bn"}
    assert all(p.loss == pytest.approx(0, abs=1e-6) for p in result.pairs)
    from lmc.core.normalization import stat_batches

    fixed = reset_bn_stats(model, sd, stat_batches(data.x_train, 2, 50, 0))
    loss, acc = evaluate(model, data.x_test, data.y_test, params=fixed)
    rows = [r for r in result.curves if r["split"] == "test"]
    assert all(r["loss"] == pytest.approx(loss, rel=1e-5) and r["acc"] == acc for r in rows)


def test_pairs_of_each_type():
    assert star_pairs("star_held_out", 1, 2, 2) == [("star0", "held_out0"), ("star0", "held_out1")]
    assert star_pairs("held_out_held_out", 1, 2, 3) == [("held_out0", "held_out1"), ("held_out0", "held_out2"),
                                                         ("held_out1", "held_out2")]
    assert len(star_pairs("anchor_held_out", 1, 3, 2)) == 6
    assert star_pairs("star_anchor", 2, 1, 0) == [("star0", "anchor0"), ("star1", "anchor0")]


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="star.t_sampling 'normal'; valid: uniform, beta, constant"):
        StarConfig(t_sampling="normal")
    with pytest.raises(ConfigError, match="star.mu_star"):
        StarConfig(mu_star=-1)
    with pytest.raises(ConfigError, match="star.permute_anchors 'yes'"):
        StarConfig(permute_anchors="yes")
    with pytest.raises(ConfigError, match="star.permute_every must be a positive integer, got 0"):
        StarConfig(permute_every=0)
    with pytest.raises(ConfigError, match="star.t_constant"):
        StarConfig(t_constant=1.5)
    with pytest.raises(ConfigError, match="pair_types"):
        StarEvalConfig(pair_types=("star_star",))
    data = tiny_data(64)
    cfg = TrainConfig(epochs=1, batch_size=32)
    with pytest.raises(ConfigError, match="at least one anchor"):
        train_star(mlp(), [], data, cfg, progress=False)
    with pytest.raises(ConfigError, match="anchor 0 does not fit the model: 'fc1.weight'"):
        train_star(mlp(), [mlp(1, width=8).state_dict()], data, cfg, progress=False)
    with pytest.raises(ConfigError, match="train.compile"):
        train_star(mlp(), [mlp(1).state_dict()], data, TrainConfig(epochs=1, compile=True), progress=False)
    with pytest.raises(ConfigError, match="no pairs"):
        evaluate_star(mlp(), [], [mlp(1).state_dict()], [mlp(2).state_dict()], data,
                      StarEvalConfig(pair_types=("star_anchor",)))


# ----------------------------------------------------------------------------------------------
# benchmark


def test_benchmark_prints_the_step_ratio(data_root, mnist1d):  # mnist1d: generated into data_root once
    script = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "star.py"
    args = ["--only", "mlp", "--epochs", "1", "--repeats", "1", "--anchors", "2", "--threads", "1", "--width", "128"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DATA_DIR": str(data_root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[2:26].strip(): line[26:].split() for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert set(rows) == {"plain", "star", "star mu=1"}
    assert rows["plain"][2] == "1.00x"
    assert all(float(fields[0]) > 0 for fields in rows.values())
    ratio = float(rows["star"][2].rstrip("x"))
    assert f"a star step costs {ratio:.2f}x a plain step" in proc.stdout
