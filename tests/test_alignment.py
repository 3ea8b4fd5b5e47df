"""Alignment methods: each recovers a random permutation of a model's own copy, on every zoo model at two
widths and on a residual CNN defined only here; merging several models; diagnostics on hand-made cases."""

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lmc
from lmc.core.alignment import align, align_many, train_batches
from lmc.core.barriers import barrier
from lmc.core.data import Dataset
from lmc.core.diagnostics import alignment_diagnostics
from lmc.core.interpolation import alpha_grid, sweep
from lmc.core.models import build_model
from lmc.core.permutation import (
    AxisRef,
    PermutationSpec,
    apply_permutation,
    cost_matrices,
    invert_permutation,
    matching_objective,
    permutation_spec,
    random_permutation,
    sinkhorn_normalize,
    weight_matching,
)
from lmc.core.permutation.activation_matching import _Recorder, _samples
from lmc.core.training import seeded_init
from lmc.errors import ConfigError


class ResCNN(nn.Module):
    """A residual CNN written by hand: functional ReLUs, an identity and a projection shortcut,
    BatchNorm and GroupNorm, and a mean over the spatial axes instead of a pooling module."""

    def __init__(self, c: int = 4, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.b1a = nn.Conv2d(c, c, 3, padding=1)
        self.b1n = nn.GroupNorm(1, c)
        self.b1b = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.b2a = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.b2b = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.b1b(F.relu(self.b1n(self.b1a(x))))
        x = torch.relu(x)
        x = self.down(x) + self.b2b(torch.relu(self.b2a(x)))
        return self.head(x.mean(dim=(2, 3)))


ZOO = [  # (id, builder, input shape) — tiny widths, two per model
    ("mlp-8", lambda: build_model("mlp", (40,), 10, width=8, depth=2), (40,)),
    ("mlp-16", lambda: build_model("mlp", (40,), 10, width=16, depth=3), (40,)),
    ("vgg11-bn-w1", lambda: build_model("vgg", (3, 8, 8), 10, depth=11, base_channels=2), (3, 8, 8)),
    ("vgg11-ln-w2", lambda: build_model("vgg", (3, 8, 8), 10, depth=11, width=2, base_channels=2,
                                        norm="layernorm"), (3, 8, 8)),
    ("resnet20-bn-w1", lambda: build_model("resnet20", (3, 8, 8), 10, base_channels=2), (3, 8, 8)),
    ("resnet20-ln-w2", lambda: build_model("resnet20", (3, 8, 8), 10, width=2, base_channels=2,
                                           norm="layernorm"), (3, 8, 8)),
    ("cnn1d-4", lambda: build_model("cnn1d", (40,), 10, width=4), (40,)),
    ("cnn1d-8-bn", lambda: build_model("cnn1d", (1, 40), 10, width=8, depth=2, norm="batchnorm"), (1, 40)),
    ("rescnn-4", lambda: ResCNN(4), (3, 8, 8)),
    ("rescnn-8", lambda: ResCNN(8), (3, 8, 8)),
]


def he_init(model):
    """He-normal weights: activations keep their scale through depth, so no unit is constant on the data."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def setup(build, shape, seed=0, n=64):
    """(model in eval mode with BN statistics of the data, spec, state dicts of A and of a permuted copy,
    the permutation, data). BN statistics of the data keep the units alive (a unit that is zero on every
    input cannot be told from another by its activations)."""
    model = seeded_init(lambda: he_init(build()), seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen) + 0.3
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # cumulative average: the running statistics become the batch's
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = permutation_spec(model, x[:2])
    perm = random_permutation(spec, seed + 1)
    sd_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd_b = apply_permutation(spec, perm, sd_a)
    return model, spec, sd_a, sd_b, perm, x, y


def alive_units(model, spec, x):
    """Per group, which of A's units are non-zero somewhere on ``x`` at one of the group's points."""
    gm = torch.fx.symbolic_trace(model)
    rec = _Recorder(gm, {p.node for pts in spec.points.values() for p in pts})
    with torch.no_grad():
        rec.run(x)
    return {g: torch.stack([_samples(rec.values[p.node], p.dim, p.block, p.offset, spec.sizes[g]).abs().amax(0) > 0
                            for p in pts]).any(0) for g, pts in spec.points.items()}


def as_model(model, sd):
    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    return other


def zero_barrier(model, sd_a, sd_b, x, y) -> float:
    rows = sweep(model, sd_a, sd_b, alpha_grid(5), {"train": (x, y)}, "m")
    return barrier(alpha_grid(5), [r["loss"] for r in rows])


def params(model, sd):
    names = {k for k, _ in model.named_parameters()}
    return {k: v for k, v in sd.items() if k in names}


def dataset(x, y):
    return Dataset(name="test", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=10)


def batches(x, y, size=16, seed=0):
    return train_batches(dataset(x, y), size, seed)


@pytest.mark.parametrize("build,shape", [pytest.param(b, s, id=i) for i, b, s in ZOO])
def test_every_method_recovers_the_permutation(build, shape):
    model, spec, sd_a, sd_b, perm, x, y = setup(build, shape)
    inverse = invert_permutation(perm)
    with torch.no_grad():
        assert (as_model(model, sd_b)(x) - model(x)).abs().max().item() <= 1e-5
    found = {
        "weight_matching": lmc.weight_matching(spec, params(model, sd_a), params(model, sd_b)),
        "activation_matching": lmc.activation_matching(spec, model, as_model(model, sd_b), [x[:24], x[24:]]),
        "ste": lmc.ste(spec, model, sd_a, sd_b, batches(x, y), steps=3, lr=1e-3),
        "sinkhorn": lmc.sinkhorn(spec, model, sd_a, sd_b, objective="weight_distance", steps=150),
    }
    assert all(torch.equal(found["weight_matching"][g], inverse[g]) for g in spec.groups)
    # activations cannot tell apart units that are zero on all the data (dead ReLUs, which deep
    # no-BatchNorm VGGs have at initialisation); every other unit is recovered exactly
    alive = alive_units(model, spec, x)
    assert sum(int(m.sum()) for m in alive.values()) >= 0.6 * sum(spec.sizes.values())
    assert all(torch.equal(found["activation_matching"][g][alive[g]], inverse[g][alive[g]]) for g in spec.groups)
    for method in ("ste", "sinkhorn"):
        aligned = apply_permutation(spec, found[method], sd_b)
        assert zero_barrier(model, sd_a, aligned, x, y) <= 1e-6, method


def _trained_mlp(width=8, steps=300):
    torch.manual_seed(0)
    model = seeded_init(lambda: build_model("mlp", (40,), 10, width=width, depth=2), 0)
    x = torch.randn(256, 40)
    y = (x @ torch.randn(40, 10)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_sinkhorn_midpoint_objective_reaches_zero_barrier():
    model, x, y = _trained_mlp()
    spec = permutation_spec(model, x[:2])
    sd_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd_b = apply_permutation(spec, random_permutation(spec, 3), sd_a)
    assert zero_barrier(model, sd_a, sd_b, x, y) > 0.1  # the permuted copy is far from A
    found = lmc.sinkhorn(spec, model, sd_a, sd_b, batches(x, y, 64), objective="midpoint", steps=200, seed=1)
    assert zero_barrier(model, sd_a, apply_permutation(spec, found, sd_b), x, y) <= 1e-6
    again = lmc.sinkhorn(spec, model, sd_a, sd_b, batches(x, y, 64), objective="midpoint", steps=200, seed=1)
    assert all(torch.equal(found[g], again[g]) for g in found)  # seeded


@pytest.mark.parametrize("sigma", [1.0, 500.0])
def test_sinkhorn_normalize_equals_the_logsumexp_formula(sigma):
    """The log_softmax form gives the plain log-domain iteration's matrix and gradient, also for sharp
    logits (entries far below their row's maximum)."""
    gen = torch.Generator().manual_seed(0)
    logits, weight = sigma * torch.randn(40, 40, generator=gen, dtype=torch.float64), torch.randn(40, 40, generator=gen)

    def plain(x, iters):
        for _ in range(iters):
            x = x - torch.logsumexp(x, dim=1, keepdim=True)
            x = x - torch.logsumexp(x, dim=0, keepdim=True)
        return x.exp()

    out = {}
    for name, fn in (("lmc", sinkhorn_normalize), ("plain", plain)):
        leaf = logits.clone().requires_grad_(True)
        mat = fn(leaf, 7)
        (mat * weight).sum().backward()
        out[name] = mat.detach(), leaf.grad
    torch.testing.assert_close(out["lmc"][0], out["plain"][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["lmc"][1], out["plain"][1], rtol=1e-7, atol=1e-10)
    mat = out["lmc"][0]
    assert float((mat.sum(0) - 1).abs().max()) < 1e-12  # the last half-step normalises the columns
    if sigma == 1.0:  # smooth logits: 7 iterations bring the rows close too (sharp ones need many more)
        assert float((mat.sum(1) - 1).abs().max()) < 1e-3
    assert torch.equal(sinkhorn_normalize(logits, 0), logits.exp())


def test_weight_matching_warm_start_carries_prices_and_keeps_the_optimum(monkeypatch):
    """``warm_start`` keeps the LAP prices of groups of at least ``_WARM`` units between calls; a warm
    call finds what a cold one finds, and so does the STE, which warm-starts every step's projection."""
    model, x, y = _trained_mlp(width=160, steps=30)
    spec = permutation_spec(model, x[:2])
    sd_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd_b = {k: v.detach() for k, v in seeded_init(lambda: build_model("mlp", (40,), 10, width=160, depth=2),
                                                  1).state_dict().items()}
    warm = {"stale": np.zeros(3)}
    first = weight_matching(spec, sd_a, sd_b, warm_start=warm)
    assert set(warm) == set(spec.groups) and all(len(p) == 160 for p in warm.values())  # "stale" dropped
    gen = torch.Generator().manual_seed(2)
    nudged = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd_a.items()}
    again = weight_matching(spec, nudged, sd_b, init_perm=first, seed=1, warm_start=warm)
    cold = weight_matching(spec, nudged, sd_b, init_perm=first, seed=1)
    assert all(torch.equal(again[g], cold[g]) for g in spec.groups)
    assert any(not torch.equal(again[g], first[g]) for g in spec.groups)  # the nudge moved something
    learned = importlib.import_module("lmc.core.permutation.learned")
    found = lmc.ste(spec, model, sd_a, sd_b, batches(x, y, 64), steps=15, lr=1e-2)
    real = learned.weight_matching
    monkeypatch.setattr(learned, "weight_matching", lambda *a, warm_start=None, **k: real(*a, **k))
    assert all(torch.equal(found[g], p) for g, p in
               lmc.ste(spec, model, sd_a, sd_b, batches(x, y, 64), steps=15, lr=1e-2).items())


def test_activation_matching_inner_product_and_bad_similarity():
    model, spec, sd_a, sd_b, perm, x, _ = setup(ZOO[1][1], (40,))
    found = lmc.activation_matching(spec, model, as_model(model, sd_b), [x], similarity="inner_product")
    inverse = invert_permutation(perm)
    assert all(torch.equal(found[g], inverse[g]) for g in spec.groups)
    with pytest.raises(ConfigError, match="'cosine'.*correlation, inner_product"):
        lmc.activation_matching(spec, model, as_model(model, sd_b), [x], similarity="cosine")


def test_align_interface_dispatches_every_method():
    model, spec, sd_a, sd_b, perm, x, y = setup(ZOO[0][1], (40,))
    data = dataset(x, y)
    other = as_model(model, sd_b)
    inverse = invert_permutation(perm)
    opts = {"steps": 3, "batch_size": 16, "num_batches": 2, "objective": "weight_distance"}
    for method in ("weight_matching", "activation_matching", "ste", "sinkhorn"):
        found = align(method, spec, model, other, data, {**opts, "steps": 150 if method == "sinkhorn" else 3})
        assert all(torch.equal(found[g], inverse[g]) for g in spec.groups), method
    assert align("none", spec, model, other, data) is None
    with pytest.raises(ConfigError, match="'magic'"):
        align("magic", spec, model, other, data)
    with pytest.raises(ConfigError, match="align.objective 'loss'.*midpoint, weight_distance"):
        align("sinkhorn", spec, model, other, data, {"objective": "loss"})


def _load_reference():
    path = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "weight_matching.py"
    module_spec = importlib.util.spec_from_file_location("wm_benchmark", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.reference_weight_matching


WM = importlib.import_module("lmc.core.permutation.weight_matching")


def _cost_path(monkeypatch, path):
    """Weight matching keeps its cost matrices one way only: every group stacked, its cost recomputed in
    full whenever another group moved or updated over the moved rows; or every group kept entry by entry
    (as large groups are)."""
    monkeypatch.setattr(WM, "_STACK", 0 if path == "per entry" else 1 << 40)
    monkeypatch.setattr(WM, "_PART", -1.0 if path == "recomputed" else 1.0 if path == "updated" else 0.5)


@pytest.mark.parametrize("path", ["recomputed", "updated", "per entry"])
@pytest.mark.parametrize("name,shape,kw", [
    ("mlp", (40,), dict(width=32, depth=3)),
    ("resnet20", (3, 8, 8), dict(base_channels=4, norm="layernorm")),
    ("cnn1d", (40,), dict(width=16)),
])
def test_fast_weight_matching_matches_the_reference_algorithm(name, shape, kw, path, monkeypatch):
    # both ways of keeping the cost matrices: terms' shares recomputed, or updated over the moved units
    _cost_path(monkeypatch, path)
    a, b = (seeded_init(lambda: build_model(name, shape, 10, **kw), s) for s in (0, 1))
    spec = permutation_spec(a, torch.randn(2, *shape))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    pa, pb = {k: v.detach() for k, v in pa.items()}, {k: v.detach() for k, v in pb.items()}
    ref = _load_reference()(spec, pa, pb)
    fast = weight_matching(spec, pa, pb)
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    obj = matching_objective(spec, fast, pa, pb)
    assert obj > matching_objective(spec, ident, pa, pb)
    assert obj >= matching_objective(spec, ref, pa, pb) - 1e-6 * abs(obj)
    # a local optimum: no single group can improve
    again = weight_matching(spec, pa, pb, init_perm=fast, seed=5)
    assert matching_objective(spec, again, pa, pb) == pytest.approx(obj, rel=1e-9)


def test_weight_matching_torch_path_equals_the_numpy_path(monkeypatch):
    """Stacks built and indexed by torch alone (as for tensors on a GPU, or dtypes numpy lacks) give the
    permutation the numpy path gives, in float32 and float64; the spec's cached layouts are reused."""
    a, b = (seeded_init(lambda: build_model("resnet20", (3, 8, 8), 10, base_channels=4), s) for s in (0, 1))
    spec = permutation_spec(a, torch.randn(2, 3, 8, 8))
    pa = {k: v.detach() for k, v in a.named_parameters()}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    found = {dtype: weight_matching(spec, pa, pb, dtype=dtype) for dtype in (torch.float32, torch.float64)}
    assert len(spec.derived["weight_matching_layouts"]) == 1  # one layout for these shapes, made once
    monkeypatch.setattr(WM, "_NUMPY", ())
    groups = WM._groups(spec, pa, pb, torch.float32)
    assert all(isinstance(g.a, torch.Tensor) and g.out is None for g in groups.values())
    for dtype, expected in found.items():
        torch_path = weight_matching(spec, pa, pb, dtype=dtype)
        assert all(torch.equal(torch_path[g], expected[g]) for g in spec.groups)
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    assert matching_objective(spec, found[torch.float32], pa, pb) > matching_objective(spec, ident, pa, pb)


@pytest.mark.parametrize("path", ["recomputed", "updated", "per entry"])
def test_weight_matching_on_a_hand_written_spec_with_three_permuted_axes(path, monkeypatch):
    """An entry permuted on three axes (its cost terms depend on two other groups each) and a flattened
    one (a group acting on blocks): the result is the reference's, both ways of keeping costs."""
    _cost_path(monkeypatch, path)
    sizes = {"P": 6, "Q": 5, "R": 4}
    spec = PermutationSpec(
        perm_to_axes={"P": [AxisRef("t", 0), AxisRef("m", 1, block=3)],
                      "Q": [AxisRef("t", 1), AxisRef("v", 0)],
                      "R": [AxisRef("t", 2), AxisRef("m", 0)]},
        sizes=sizes,
        axes_to_perm={"t": ("P", "Q", "R"), "m": ("R", "P"), "v": ("Q",)},
    )
    gen = torch.Generator().manual_seed(0)
    shapes = {"t": (6, 5, 4), "m": (4, 18), "v": (5,)}
    pa = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    pb = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    ref = _load_reference()(spec, pa, pb)
    found = weight_matching(spec, pa, pb)
    obj = matching_objective(spec, found, pa, pb)
    assert obj >= matching_objective(spec, ref, pa, pb) - 1e-9 * abs(obj)
    assert obj > matching_objective(spec, {g: torch.arange(n) for g, n in sizes.items()}, pa, pb)
    # a permuted copy is recovered exactly
    perm = random_permutation(spec, 3)
    back = weight_matching(spec, pa, apply_permutation(spec, perm, pa))
    assert all(torch.equal(back[g], invert_permutation(perm)[g]) for g in sizes)


def test_exact_gain_and_warm_started_assignment(monkeypatch):
    """The float64 re-check of a move equals the cost matrices' difference (stacked groups and groups kept
    entry by entry); the LAP solved on the
    row- and column-reduced cost, with or without carried-over column prices, finds the plain solver's
    optimum along a chain of changing costs, and the prices become the LAP's duals."""
    a, b = (seeded_init(lambda: build_model("resnet20", (3, 8, 8), 10, base_channels=4), s) for s in (0, 1))
    spec = permutation_spec(a, torch.randn(2, 3, 8, 8))
    pa = {k: v.detach() for k, v in a.named_parameters()}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    perm = random_permutation(spec, 1)
    costs = cost_matrices(spec, perm, pa, pb)
    for stack in (1 << 40, 0):
        monkeypatch.setattr(WM, "_STACK", stack)
        groups = WM._groups(spec, pa, pb, torch.float64)
        assert all(isinstance(x, WM._Group if stack else WM._LargeGroup) for x in groups.values())
        for g, n in spec.sizes.items():
            new = torch.randperm(n, generator=torch.Generator().manual_seed(n))
            rows = torch.nonzero(new != perm[g]).flatten()
            expected = float(costs[g][rows, new[rows]].sum() - costs[g][rows, perm[g][rows]].sum())
            found = groups[g].exact_gain({k: p.numpy() for k, p in perm.items()}, rows.numpy(), new.numpy(),
                                         perm[g].numpy())
            assert found == pytest.approx(expected, rel=1e-12, abs=1e-12)
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    cost, prices = rng.standard_normal((60, 60)), None
    for _ in range(20):
        col, prices = WM._assign(cost, prices, relax=True)
        cold, no_prices = WM._assign(cost)  # row- and column-reduced, no prices
        best = linear_sum_assignment(cost, maximize=True)[1]
        for found in (col, cold):
            assert cost[np.arange(60), found].sum() == pytest.approx(cost[np.arange(60), best].sum(), rel=1e-12)
            assert sorted(found) == list(range(60))
        assert prices.max() == 0 and no_prices is None
        cost = cost + 0.1 * rng.standard_normal((60, 60))
    # on a fixed cost, the prices' relaxations converge to LAP duals: every row's assigned column is
    # then its cheapest under the prices (complementary slackness)
    for _ in range(70):
        col, prices = WM._assign(cost, prices, relax=True)
    reduced = -cost - prices
    assert np.allclose(reduced[np.arange(60), col], reduced.min(1), rtol=0, atol=1e-12)


def test_align_to_reference_and_merge_many_on_permuted_copies():
    model, spec, sd_a, _, _, x, y = setup(ZOO[5][1], (3, 8, 8))
    copies = [sd_a] + [apply_permutation(spec, random_permutation(spec, s), sd_a) for s in (10, 11, 12)]
    perms, aligned = lmc.align_to_reference(spec, copies)
    assert all(torch.equal(al[k], sd_a[k]) for al in aligned for k in sd_a)
    perms, merged = lmc.merge_many(spec, copies)
    # all copies land in one frame: the merged model is the permuted original, with A's outputs
    with torch.no_grad():
        assert (as_model(model, merged)(x) - model(x)).abs().max().item() <= 1e-5
    frames = [apply_permutation(spec, p, sd) for p, sd in zip(perms, copies)]
    assert all(torch.allclose(f[k], frames[0][k]) for f in frames for k in sd_a)
    pairwise = lmc.pairwise_barriers(model, frames[:3], alpha_grid(3), {"train": (x, y)}, names=["a", "b", "c"])
    assert set(pairwise) == {"a-b", "a-c", "b-c"}
    assert all(abs(v["train"]["loss"]) <= 1e-6 for v in pairwise.values())


def test_merge_many_brings_independent_models_closer():
    sds = [seeded_init(lambda: build_model("mlp", (40,), 10, width=32, depth=2), s).state_dict() for s in range(3)]
    spec = permutation_spec(build_model("mlp", (40,), 10, width=32, depth=2), torch.randn(2, 40))
    perms, merged = lmc.merge_many(spec, sds)
    dist = lambda a, b: sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)  # noqa: E731
    frames = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)]
    assert dist(frames[1], frames[2]) < 0.95 * dist(sds[1], sds[2])
    assert all(torch.allclose(merged[k], sum(f[k] for f in frames) / 3) for k in merged)


def test_align_many_modes_and_errors():
    # width 32: at tiny widths weight matching can stop in a local optimum even for exact copies
    model, spec, sd_a, _, _, x, y = setup(lambda: build_model("mlp", (40,), 10, width=32, depth=2), (40,))
    copies = [as_model(model, apply_permutation(spec, random_permutation(spec, s), sd_a)) for s in (0, 1, 2)]
    for merge in ("reference", "merge_many"):
        perms = align_many("weight_matching", merge, spec, copies)
        frames = [apply_permutation(spec, p, m.state_dict()) for p, m in zip(perms, copies)]
        assert all(torch.equal(perms[0][g], torch.arange(n)) for g, n in spec.sizes.items())
        assert all(torch.allclose(f[k], frames[0][k]) for f in frames for k in frames[0]), merge
    with pytest.raises(ConfigError, match="merge_many uses weight matching.*ste"):
        align_many("ste", "merge_many", spec, copies)
    with pytest.raises(ConfigError, match="'all'.*none, reference, merge_many"):
        align_many("weight_matching", "all", spec, copies)


def test_diagnostics_on_a_permuted_copy():
    model, spec, sd_a, sd_b, perm, _, _ = setup(ZOO[1][1], (40,))
    pa, pb = params(model, sd_a), params(model, sd_b)
    found = weight_matching(spec, pa, pb)
    d = alignment_diagnostics(spec, pa, pb, found, top_k=3)
    assert d["l2_before"] > 1.0 and d["l2_after"] == 0.0
    best = sum(float((pa[k].double() ** 2).sum()) for k in pa if any(spec.axes_to_perm[k]))
    assert d["objective_after"] == pytest.approx(best, rel=1e-12)
    assert d["objective_before"] < d["objective_after"]
    for key, layer in d["layers"].items():
        assert layer["sv_a"] == pytest.approx(layer["sv_b"], rel=1e-9), key  # permutation keeps singular values
        assert layer["left_after"] == pytest.approx([1.0] * 3, abs=1e-9), key
        assert layer["right_after"] == pytest.approx([1.0] * 3, abs=1e-9), key
    # the hidden layer's singular vectors are scrambled before alignment
    assert min(d["layers"]["fc2.weight"]["left_before"]) < 0.9


def test_diagnostics_singular_vectors_by_hand():
    spec = permutation_spec(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), torch.randn(1, 2))
    a = {"0.weight": torch.diag(torch.tensor([3.0, 1.0])), "2.weight": torch.eye(2)}
    b = {"0.weight": torch.tensor([[0.0, 1.0], [3.0, 0.0]]), "2.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    d = alignment_diagnostics(spec, a, b, {"P_0": torch.tensor([1, 0])})
    layer = d["layers"]["0.weight"]
    assert layer["sv_a"] == pytest.approx([3.0, 1.0]) and layer["sv_b"] == pytest.approx([3.0, 1.0])
    assert layer["left_before"] == pytest.approx([0.0, 0.0]) and layer["left_after"] == pytest.approx([1.0, 1.0])
    assert d["l2_before"] == pytest.approx((9 + 1 + 9 + 1 + 4) ** 0.5) and d["l2_after"] == pytest.approx(0.0)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "align")
                                        .glob("*.yaml")))
def test_every_align_config_runs(name):
    from hydra import compose, initialize_config_dir

    from lmc.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"align={name}"])
    assert cfg.align.method == name and cfg.align.merge == "none"
    options = {**cfg.align, "steps": 2, "num_batches": 1, "batch_size": 8}
    model, spec, sd_a, sd_b, perm, x, y = setup(lambda: build_model("mlp", (40,), 10, width=32, depth=2), (40,))
    found = align(name, spec, model, as_model(model, sd_b), dataset(x, y), options)
    if name == "none":
        assert found is None
    else:
        assert set(found) == set(spec.groups)
        assert all(torch.equal(torch.sort(p).values, torch.arange(len(p))) for p in found.values())


def test_learned_methods_leave_the_models_untouched():
    model, spec, sd_a, sd_b, _, x, y = setup(ZOO[4][1], (3, 8, 8))  # ResNet-20 with BatchNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lmc.ste(spec, model, model.state_dict(), sd_b, batches(x, y), steps=2)
    lmc.sinkhorn(spec, model, model.state_dict(), sd_b, batches(x, y), steps=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training
