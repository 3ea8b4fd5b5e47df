"""Property test of the permutation-spec derivation: random small models composed from a menu of operations
(layers, norms, activations, residual adds, pooling, flatten, cat, chunk, split, reductions, reshapes,
permutes, gates, grouped convolutions, dropout, and operations that cannot be permuted). For each model,
either the derivation refuses (only allowed when the model holds an operation marked as refusable), or a
random permutation preserves the outputs and weight matching of the permuted copy onto the original gives
back the original state dict exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from lmc.core.permutation import (
    UnsupportedOperationError,
    apply_permutation,
    permutation_spec,
    random_permutation,
    weight_matching,
)

BATCH = 4


class Step(nn.Module):
    """One operation of a generated model: ``forward(h, history) -> h``. ``refusable``: the derivation may
    refuse it (it has no permutation rule, or its symmetry cannot be expressed)."""

    refusable = False
    world = "conv"  # the tensor it takes: "conv" (N, C, L) or "flat" (N, F)

    def out_channels(self, c: int) -> int:
        return c


class Conv(Step):
    def __init__(self, c, out, k, groups):
        super().__init__()
        self.conv = nn.Conv1d(c, out, k, padding=k // 2, groups=groups, bias=bool(out % 2))
        self.out = out

    def out_channels(self, c):
        return self.out

    def forward(self, h, hist):
        return self.conv(h)


class Norm(Step):
    def __init__(self, c, kind, groups):
        super().__init__()
        self.kind = kind
        self.norm = {"bn": lambda: nn.BatchNorm1d(c), "gn": lambda: nn.GroupNorm(groups, c),
                     "in": lambda: nn.InstanceNorm1d(c, affine=True), "ln_last": lambda: nn.LayerNorm(c)}[kind]()

    def forward(self, h, hist):
        if self.kind == "ln_last":  # ConvNeXt: channels last, LayerNorm over them, back
            return self.norm(h.permute(0, 2, 1)).permute(0, 2, 1)
        return self.norm(h)


ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh, "f.relu": lambda: (lambda h: F.relu(h)), "sigmoid": lambda: torch.sigmoid,
    "leaky": lambda: (lambda h: F.leaky_relu(h, 0.1)), "softmax_c": lambda: (lambda h: torch.softmax(h, 1)),
    "clamp": lambda: (lambda h: h.clamp(-1.0, 2.0)), "dropout": lambda: nn.Dropout(0.2),
    "f.dropout": lambda: (lambda h: F.dropout(h, 0.1, training=False)),
}


class Act(Step):
    def __init__(self, kind, world):
        super().__init__()
        self.kind, self.world = kind, world
        made = ACTIVATIONS[kind]()
        if isinstance(made, nn.Module):
            self.mod = made
        else:
            self.fn = made

    def forward(self, h, hist):
        return self.mod(h) if hasattr(self, "mod") else self.fn(h)


class Residual(Step):
    """h + conv(act(conv(h))) or, flat, h + W h (a stream shared by the add)."""

    def __init__(self, c, world, hidden):
        super().__init__()
        self.world = world
        if world == "conv":
            self.a, self.b = nn.Conv1d(c, hidden, 3, padding=1), nn.Conv1d(hidden, c, 1)
        else:
            self.a, self.b = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, h, hist):
        return h + self.b(F.relu(self.a(h)))


class SqueezeExcite(Step):
    """x * sigmoid(fc2(relu(fc1(mean(x))))) (MobileNetV3, EfficientNet)."""

    def __init__(self, c, squeeze, hard):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv1d(c, squeeze, 1), nn.Conv1d(squeeze, c, 1)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, h, hist):
        return h * self.gate(self.fc2(F.relu(self.fc1(h.mean(2, keepdim=True)))))


class GatedChunk(Step):
    """a, b = W h .chunk(2); a * sigmoid(b) (a gated linear unit)."""

    def __init__(self, c, out, world):
        super().__init__()
        self.world, self.out = world, out
        self.proj = nn.Conv1d(c, 2 * out, 1) if world == "conv" else nn.Linear(c, 2 * out)

    def out_channels(self, c):
        return self.out

    def forward(self, h, hist):
        a, b = self.proj(h).chunk(2, 1)
        return a * torch.sigmoid(b)


class Glu(Step):
    def __init__(self, c):
        super().__init__()

    def out_channels(self, c):
        return c // 2

    def forward(self, h, hist):
        return F.glu(h, 1)


class SplitTake(Step):
    """torch.split(h, size, 1)[index]: one piece of the features (the others unread)."""

    def __init__(self, c, size, index):
        super().__init__()
        self.size, self.index = size, index
        self.pieces = [min(size, c - i) for i in range(0, c, size)]

    def out_channels(self, c):
        return self.pieces[self.index]

    def forward(self, h, hist):
        return torch.split(h, self.size, 1)[self.index]


class Slice(Step):
    def __init__(self, c, start, stop):
        super().__init__()
        self.start, self.stop = start, stop

    def out_channels(self, c):
        return self.stop - self.start

    def forward(self, h, hist):
        return h[:, self.start:self.stop]


class Branches(Step):
    """cat([conv_a(h), conv_b(h)], 1) (Inception, SqueezeNet's fire)."""

    def __init__(self, c, a, b, world):
        super().__init__()
        self.world, self.out = world, a + b
        if world == "conv":
            self.a, self.b = nn.Conv1d(c, a, 1), nn.Conv1d(c, b, 3, padding=1)
        else:
            self.a, self.b = nn.Linear(c, a), nn.Linear(c, b)

    def out_channels(self, c):
        return self.out

    def forward(self, h, hist):
        return torch.cat([F.relu(self.a(h)), torch.tanh(self.b(h))], 1)


class CatEarlier(Step):
    """cat([h, an earlier tensor of the same length], 1) (DenseNet)."""

    def __init__(self, index, extra, world):
        super().__init__()
        self.index, self.extra, self.world = index, extra, world

    def out_channels(self, c):
        return c + self.extra

    def forward(self, h, hist):
        return torch.cat([h, hist[self.index]], 1)


class Pool(Step):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.pool = nn.MaxPool1d(2) if kind == "max" else nn.AvgPool1d(2)

    def forward(self, h, hist):
        return self.pool(h)


class StochasticDepth(Step):
    """A per-sample scale (stochastic depth in training mode) on a residual branch."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 1)

    def forward(self, h, hist):
        keep = (torch.arange(h.shape[0], device=h.device) % 3 != 0).to(h.dtype).view(-1, 1, 1)
        return h + self.conv(h) * keep


class ScaleParam(Step):
    """h * self.scale with a per-channel parameter (ConvNeXt's layer scale), read directly."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c, 1) + 0.5)

    def forward(self, h, hist):
        return h * self.scale


class ChannelMax(Step):
    """h * amax over the channels (invariant under their permutation)."""

    def forward(self, h, hist):
        return h * h.amax(1, keepdim=True).sigmoid()


class ChannelPad(Step):
    """Constant channels padded on both sides of the features."""

    def out_channels(self, c):
        return c + 3

    def forward(self, h, hist):
        return F.pad(h, (0, 0, 1, 2), value=0.5)


class Repeat(Step):
    """The features twice: (N, C, L) → (N, 2C, L) by repeat, or by stacking two tensors and merging axes."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def out_channels(self, c):
        return 2 * c

    def forward(self, h, hist):
        if self.kind == "repeat":
            return h.repeat(1, 2, 1)
        return torch.stack([h, torch.tanh(h)], 1).flatten(1, 2)


class Reorder(Step):
    """Order-dependent operations along the length axis, a select and a where, none on the features."""

    def forward(self, h, hist):
        h = torch.where(h > 0, h, 0.1 * h).flip(2).narrow(2, 0, h.shape[2])
        return h + h.select(2, 0)[:, :, None].expand_as(h) + h.roll(1, 2).index_select(2, torch.arange(h.shape[2]))


class ToFlat(Step):
    """conv → flat: flatten, reshape, mean, max(dim=2).values, amax, topk values along the length."""

    def __init__(self, kind, length):
        super().__init__()
        self.kind, self.length = kind, length

    def out_channels(self, c):
        return c * self.length if self.kind in ("flatten", "reshape", "view") else c

    def forward(self, h, hist):
        if self.kind == "flatten":
            return h.flatten(1)
        if self.kind == "reshape":
            return h.reshape(h.shape[0], -1)
        if self.kind == "view":
            return torch.flatten(h.contiguous().view(h.size(0), -1, 1), 1)
        if self.kind == "mean":
            return h.mean(dim=2)
        if self.kind == "max":
            return h.max(dim=2).values
        if self.kind == "topk":
            return h.topk(2, dim=2).values.sum(2)
        return torch.amax(h, 2)


class Linear(Step):
    world = "flat"

    def __init__(self, c, out):
        super().__init__()
        self.fc, self.out = nn.Linear(c, out), out

    def out_channels(self, c):
        return self.out

    def forward(self, h, hist):
        return self.fc(h)


class FlatNorm(Step):
    world = "flat"

    def __init__(self, c, kind):
        super().__init__()
        self.norm = nn.LayerNorm(c) if kind == "ln" else nn.BatchNorm1d(c)

    def forward(self, h, hist):
        return self.norm(h)


class Gate(Step):
    world = "flat"

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, h, hist):
        return h * torch.sigmoid(self.fc(h))


class TokenMix(Step):
    """(N, C, L) → (N, L, C), a Linear on the channels, back (a permute around a layer)."""

    def __init__(self, c, out):
        super().__init__()
        self.fc, self.out = nn.Linear(c, out), out

    def out_channels(self, c):
        return self.out

    def forward(self, h, hist):
        return self.fc(h.transpose(1, 2)).transpose(1, 2)


class Attention(Step):
    """Self-attention over the length axis, one or two heads."""

    def __init__(self, c):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, 2 if c % 2 == 0 else 1, batch_first=True)

    def forward(self, h, hist):
        t = h.transpose(1, 2)
        return self.attn(t, t, t, need_weights=False)[0].transpose(1, 2)


# ---- refusable: operations whose symmetry cannot be expressed, or that have no rule

class ChannelShuffle(Step):
    refusable = True

    def forward(self, h, hist):
        n, c, length = h.shape
        return h.view(n, 2, c // 2, length).transpose(1, 2).reshape(n, c, length)


class Unbind(Step):
    refusable = True

    def forward(self, h, hist):
        parts = h.unbind(1)
        return torch.stack(parts[::-1], 1)


class ArgmaxUsed(Step):
    refusable = True

    def forward(self, h, hist):
        return h + h.argmax(1, keepdim=True).to(h.dtype)


class SortIndices(Step):
    refusable = True

    def forward(self, h, hist):
        return h + h.sort(dim=1).indices.to(h.dtype)


class Cumsum(Step):
    refusable = True

    def forward(self, h, hist):
        return h.cumsum(1)


class Generated(nn.Module):
    def __init__(self, c_in: int, length: int, steps: list[Step], classes: int):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.length = length
        self.head = nn.LazyLinear(classes)

    def forward(self, x):
        hist, h = [], x
        for step in self.steps:
            hist.append(h)
            h = step(h, hist)
        return self.head(h.flatten(1))


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def models(draw, refusable: bool = True):
    """A random model: conv steps on (N, C, L), then (optionally) flat steps on (N, F), then a head."""
    c = c_in = draw(st.integers(1, 4))
    length = draw(st.sampled_from([4, 6, 8]))
    steps, world = [], "conv"
    widths, lengths, worlds = [c], [length], [world]  # of each history entry (the input of each step)
    kinds_conv = ["conv", "conv", "gconv", "norm", "act", "residual", "se", "gated", "glu", "split", "slice",
                  "branches", "cat", "pool", "sdepth", "scale", "chmax", "tokenmix", "attention", "pad", "repeat",
                  "reorder"]
    kinds_flat = ["linear", "linear", "fnorm", "act", "residual", "gated", "gate", "split", "slice", "branches",
                  "cat"]
    refusals = ["shuffle", "unbind", "argmax", "sort", "cumsum"] if refusable else []
    n_steps = draw(st.integers(1, 7))
    for _ in range(n_steps):
        if world == "conv":
            kind = draw(st.sampled_from(kinds_conv + refusals + ["toflat"]))
        else:
            kind = draw(st.sampled_from(kinds_flat))
        step = None
        if kind == "toflat":
            step = ToFlat(draw(st.sampled_from(["flatten", "reshape", "view", "mean", "max", "topk", "amax"])), length)
        elif kind in ("conv", "gconv"):
            if kind == "gconv":
                groups = draw(st.sampled_from(_divisors(c)))
                out = groups * draw(st.integers(1, 3))
            else:
                groups, out = 1, draw(st.integers(2, 8))
            step = Conv(c, out, draw(st.sampled_from([1, 3])), groups)
        elif kind == "norm":
            norm = draw(st.sampled_from(["bn", "gn", "in", "ln_last"]))
            step = Norm(c, norm, draw(st.sampled_from(_divisors(c))))
        elif kind == "fnorm":
            step = FlatNorm(c, draw(st.sampled_from(["ln", "bn"])))
        elif kind == "act":
            step = Act(draw(st.sampled_from(sorted(ACTIVATIONS))), world)
        elif kind == "residual":
            step = Residual(c, world, draw(st.integers(2, 6)))
        elif kind == "se":
            step = SqueezeExcite(c, draw(st.integers(1, 4)), draw(st.booleans()))
        elif kind == "gated":
            step = GatedChunk(c, draw(st.integers(1, 5)), world)
        elif kind == "glu" and c % 2 == 0 and c >= 4:
            step = Glu(c)
        elif kind == "split" and c >= 2:
            size = draw(st.integers(1, c - 1))
            step = SplitTake(c, size, draw(st.integers(0, math.ceil(c / size) - 1)))
        elif kind == "slice" and c >= 2:
            start = draw(st.integers(0, c - 1))
            step = Slice(c, start, draw(st.integers(start + 1, c)))
        elif kind == "branches":
            step = Branches(c, draw(st.integers(1, 4)), draw(st.integers(1, 4)), world)
        elif kind == "cat":
            same = [i for i in range(len(widths)) if worlds[i] == world and (world == "flat" or lengths[i] == length)]
            if same:
                index = draw(st.sampled_from(same))
                step = CatEarlier(index, widths[index], world)
        elif kind == "pool" and length >= 4:
            step = Pool(draw(st.sampled_from(["max", "avg"])))
        elif kind == "sdepth":
            step = StochasticDepth(c)
        elif kind == "scale":
            step = ScaleParam(c)
        elif kind == "chmax":
            step = ChannelMax()
        elif kind == "tokenmix":
            step = TokenMix(c, draw(st.integers(1, 6)))
        elif kind == "linear":
            step = Linear(c, draw(st.integers(2, 8)))
        elif kind == "gate":
            step = Gate(c)
        elif kind == "shuffle" and c % 2 == 0 and c >= 4:
            step = ChannelShuffle()
        elif kind == "unbind" and c >= 2:
            step = Unbind()
        elif kind == "argmax":
            step = ArgmaxUsed()
        elif kind == "sort" and c >= 2:
            step = SortIndices()
        elif kind == "cumsum" and c >= 2:
            step = Cumsum()
        elif kind == "attention":
            step = Attention(c)
        elif kind == "pad":
            step = ChannelPad()
        elif kind == "repeat":
            step = Repeat(draw(st.sampled_from(["repeat", "stack"])))
        elif kind == "reorder":
            step = Reorder()
        if step is None:
            continue
        step.world = world
        steps.append(step)
        c = step.out_channels(c)
        if isinstance(step, Pool):
            length //= 2
        if isinstance(step, ToFlat):
            world = "flat"
            length = 1
        widths.append(c)
        lengths.append(length)
        worlds.append(world)
    model = Generated(c_in, lengths[0], steps, classes=3)
    return model, (c_in, lengths[0])


def _prepare(model, shape, seed):
    """Random weights everywhere (norm parameters and statistics too: no ties between units)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *shape, generator=gen)
    model.eval()
    with torch.no_grad():
        model(x)  # materialise the lazy head
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "running_var" not in name else 0.2))
                if "running_var" in name:
                    p.abs_().add_(0.5)
    return x


def check(model, shape, seed=0):
    """The property: refused (only if allowed), or permutation-equivariant and recovered by weight matching.
    Returns the spec (None if refused)."""
    x = _prepare(model, shape, seed)
    refusable = any(s.refusable for s in model.steps)
    for step in model.steps:
        event(type(step).__name__)
    try:
        spec = permutation_spec(model, x[:2])
    except UnsupportedOperationError as exc:
        assert refusable, f"refused a model of supported operations: {exc}\n{model}"
        event("refused")
        return None
    event("derived, refusable step" if refusable else "derived")
    sd = model.state_dict()
    perm = random_permutation(spec, seed + 1)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(spec, perm, sd))
    with torch.no_grad():
        ya, yb = model(x), permuted(x)
    err = float((ya - yb).norm() / ya.norm().clamp_min(1e-12))
    assert err <= 1e-5, f"outputs changed by {err:.2e} (relative)\n{spec}\n{model}"
    params_a = {k: v for k, v in sd.items() if k in dict(model.named_parameters())}
    params_b = {k: v for k, v in permuted.state_dict().items() if k in params_a}
    found = weight_matching(spec, params_a, params_b, init="sequential")
    back = apply_permutation(spec, found, permuted.state_dict())
    wrong = [k for k in sd if not torch.equal(back[k], sd[k])]
    assert not wrong, f"weight matching did not give back {wrong[:5]}\n{spec}"
    return spec


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=300, derandomize=True, **SETTINGS)
@given(models())
def test_random_models_are_permuted_correctly_or_refused(built):
    model, shape = built
    check(model, shape)


@pytest.mark.slow
@settings(max_examples=5000, **SETTINGS)
@given(models(), st.integers(0, 1000))
def test_many_random_models(built, seed):
    model, shape = built
    check(model, shape, seed)
