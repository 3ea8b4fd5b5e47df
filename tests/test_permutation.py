import copy

import pytest
import torch
from torch import nn

from lmc.core.barriers import barrier
from lmc.core.interpolation import alpha_grid, sweep
from lmc.core.models import build_model
from lmc.core.permutation import (
    UnsupportedOperationError,
    apply_permutation,
    invert_permutation,
    matching_objective,
    permutation_spec,
    random_permutation,
    weight_matching,
)
from lmc.core.training import seeded_init


def mlp(width, depth=3, seed=0, in_features=40):
    return seeded_init(lambda: build_model("mlp", (in_features,), 10, width=width, depth=depth), seed)


def permuted_copy(model, spec, seed):
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return other, perm


def test_mlp_spec_groups_and_axes():
    spec = permutation_spec(mlp(32, depth=3), torch.randn(2, 40))
    assert spec.sizes == {"P_fc1": 32, "P_fc2": 32, "P_fc3": 32}
    assert spec.axes_to_perm["fc1.weight"] == ("P_fc1", None)  # input features stay fixed
    assert spec.axes_to_perm["fc2.weight"] == ("P_fc2", "P_fc1")
    assert spec.axes_to_perm["fc2.bias"] == ("P_fc2",)
    assert spec.axes_to_perm["head.weight"] == (None, "P_fc3")  # logits stay fixed
    assert spec.axes_to_perm["head.bias"] == (None,)
    assert list(spec.layers) == ["fc1", "fc2", "fc3", "head"]


@pytest.mark.parametrize("width,depth", [(16, 2), (128, 4)])
def test_random_permutation_preserves_outputs(width, depth):
    model = mlp(width, depth)
    x = torch.randn(64, 40)
    spec = permutation_spec(model, x[:2])
    permuted, perm = permuted_copy(model, spec, seed=3)
    # the permutation really moved the weights...
    assert not torch.equal(permuted.fc1.weight, model.fc1.weight)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    # ...and the function is the same
    diff = (permuted(x) - model(x)).abs().max().item()
    assert diff <= 1e-5


def test_permutation_then_inverse_is_identity():
    model = mlp(64)
    spec = permutation_spec(model, torch.randn(2, 40))
    perm = random_permutation(spec, 7)
    sd = model.state_dict()
    back = apply_permutation(spec, invert_permutation(perm), apply_permutation(spec, perm, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("width", [32, 256])
def test_weight_matching_recovers_random_permutation(width):
    model = mlp(width, seed=width)
    x = torch.randn(128, 40)
    spec = permutation_spec(model, x[:2])
    perm = random_permutation(spec, 11)
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, perm, sd_a)
    found = weight_matching(spec, sd_a, sd_b, seed=0)
    # aligning B undoes the permutation: found = perm^-1
    inverse = invert_permutation(perm)
    assert all(torch.equal(found[g], inverse[g]) for g in spec.groups)
    aligned = apply_permutation(spec, found, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
    # and the interpolation barrier of A and aligned B is zero
    y = torch.randint(0, 10, (128,))
    rows = sweep(model, sd_a, aligned, alpha_grid(9), {"test": (x, y)}, "wm")
    losses = [r["loss"] for r in rows]
    assert abs(barrier(alpha_grid(9), losses)) <= 1e-6
    # the objective reached equals ‖θ_A‖² over the permuted entries, the maximum possible
    best = sum(float((sd_a[k].double() ** 2).sum()) for k in sd_a if any(spec.axes_to_perm[k]))
    assert matching_objective(spec, found, sd_a, sd_b) == pytest.approx(best, rel=1e-12)


def test_weight_matching_improves_objective_on_independent_models():
    a, b = mlp(64, seed=0), mlp(64, seed=1)
    spec = permutation_spec(a, torch.randn(2, 40))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    ident = {g: torch.arange(n) for g, n in spec.sizes.items()}
    found = weight_matching(spec, pa, pb)
    assert matching_objective(spec, found, pa, pb) > matching_objective(spec, ident, pa, pb) + 1e-3
    # seeded: the same seed gives the same permutation
    again = weight_matching(spec, pa, pb)
    assert all(torch.equal(found[g], again[g]) for g in found)


class ConvFlatten(nn.Module):
    """Conv → BN → ReLU → flatten (3 spatial positions per channel) → Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, stride=2)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8 * 3, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.flatten(x, 1)
        return self.out(torch.relu(self.fc(x)))


def test_flatten_permutes_blocks_and_bn_stats_follow():
    model = seeded_init(ConvFlatten, 0)
    x = torch.randn(32, 1, 8)
    model.train()
    model(x)  # populate running stats
    model.eval()
    spec = permutation_spec(model, x[:2])
    assert spec.axes_to_perm["bn.running_mean"] == ("P_conv",)
    assert spec.block("fc.weight", 1) == 3
    permuted, _ = permuted_copy(model, spec, seed=1)
    assert (permuted(x) - model(x)).abs().max().item() <= 1e-5


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cat([h[:, :4], h[:, 4:]], dim=1))


def test_unsupported_operation_is_named():
    with pytest.raises(UnsupportedOperationError, match=r"getitem|cat"):
        permutation_spec(Concat(), torch.randn(2, 4))


def test_grouped_conv_is_rejected_with_module_name():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 5, 5))
    with pytest.raises(UnsupportedOperationError, match=r"module '0' \(Conv2d\).*grouped"):
        permutation_spec(model, torch.randn(1, 4, 5, 5))


class Residual(nn.Module):
    """Two residual blocks on one stream (identity shortcuts), written with functional ops."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.n1 = nn.BatchNorm2d(c)
        self.b1, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.a2(torch.relu(self.n1(self.a1(x))))
        x = x + self.b2(torch.relu(self.b1(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_residual_stream_is_one_group_and_points_are_block_inputs():
    model = seeded_init(Residual, 0).eval()
    x = torch.randn(4, 3, 6, 6)
    spec = permutation_spec(model, x[:2])
    stream = spec.axes_to_perm["stem.weight"][0]
    for key in ("a2.weight", "b2.weight"):
        assert spec.axes_to_perm[key][0] == stream  # the residual branch writes to the stream
    for key in ("a1.weight", "b1.weight", "head.weight"):
        assert spec.axes_to_perm[key][1] == stream  # ...and every reader reads it
    assert spec.axes_to_perm["n1.running_var"] == (spec.axes_to_perm["a1.weight"][0],)
    assert len(spec.groups) == 3
    # activation points of the stream: the input of each block and the final features
    assert [name for name, _, _ in spec.points[stream]] == ["relu", "add", "mean"]
    permuted, _ = permuted_copy(model, spec, seed=2)
    assert (permuted(x) - model(x)).abs().max().item() <= 1e-5


class AttentionOnFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.fc(x)
        return self.attn(h, h, h, need_weights=False)[0].sum(dim=1)


class ScaleByParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.fc(x) * self.scale)


@pytest.mark.parametrize("model,x,match", [
    (AttentionOnFeatures(), torch.randn(2, 3, 4), r"module 'attn' \(MultiheadAttention\)"),
    (ScaleByParameter(), torch.randn(2, 4), r"parameter 'scale'"),
])
def test_unknown_layers_on_permuted_features_are_named(model, x, match):
    with pytest.raises(UnsupportedOperationError, match=match):
        permutation_spec(model, x)
