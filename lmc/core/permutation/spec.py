"""Permutation specs: which parameter/buffer axes each permutation group acts on.

A :class:`PermutationSpec` is Git Re-Basin's perm→axes map. Here it is *derived* from the model by tracing
it with ``torch.fx`` and following, through the graph, how the feature (channel) axis of every
intermediate tensor is made up. A feature axis is a sequence of *segments*: a run of units of one
permutation group (each unit ``block`` consecutive entries, after a flatten), or a run of entries no
permutation moves (fixed). Groups live in a union-find that can also *refine* a group into consecutive
sub-groups when only part of its units travel together:

* a Linear/Conv layer starts a new group on its output features; its weight's input axis takes the
  layout of its input;
* ``cat`` along the feature axis concatenates the operands' layouts (a block permutation: each operand
  keeps its own groups); ``chunk``/``split``/slicing along it cut the layout (the groups there are refined
  into the pieces' sub-groups);
* element-wise operations (``a + b``, ``a * sigmoid(b)``, ``where``…) make their operands' layouts one:
  groups acting on the same entries are merged (refined first where their boundaries differ);
* normalisation layers, activations, dropout, pooling over other axes keep the layout, and their
  per-feature parameters follow it; reductions over other axes keep it, reductions over the feature axis
  (mean, max values…) are invariant; reshapes, ``permute``/``transpose`` move the feature axis, and
  ``flatten`` turns units into blocks;
* a grouped convolution acts within each of its groups: its input's layout is cut at the group
  boundaries and each group's output channels are a group of their own (a restricted but exact symmetry;
  a depthwise convolution keeps its input's groups, with blocks for a channel multiplier);
* ``nn.MultiheadAttention`` permutes the query and key channels of each head together, and its value
  channels with the output projection's inputs;
* a model parameter read directly (``x * self.scale``, ``F.layer_norm(x, s, self.weight)``) follows the
  features it multiplies; read any other way, it and whatever it meets stay fixed;
* the model's inputs and outputs are fixed (never permuted).

The model is traced in training mode and in evaluation mode (they can differ: auxiliary heads), and both
graphs constrain the same groups. A state-dict entry whose axes are made of several segments (a weight
reading a ``cat``, a grouped convolution's weight) is described as *pieces*: sub-tensors on each axis of
which one group acts (``PermutationSpec.pieces``).

Anything the derivation does not understand raises :class:`UnsupportedOperationError` naming the node
and operation: every node whose inputs carry permuted features either has a rule here or is refused; there
is no default that drops features.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn

__all__ = ["AxisRef", "Piece", "Point", "PermutationSpec", "UnsupportedOperationError", "permutation_spec",
           "trace"]

_MAX_SEGMENTS = 4096  # a feature axis of more segments (a reshape repeating features many times) is refused


class UnsupportedOperationError(ValueError):
    """The model contains an operation the permutation-spec derivation cannot handle."""


@dataclass(frozen=True)
class AxisRef:
    """One axis of one entry acted on by a permutation group.

    ``key`` is a state-dict key, or the name of a piece of one (:attr:`PermutationSpec.pieces`).
    ``block`` > 1 means the axis has ``size * block`` entries laid out as ``size`` consecutive blocks of
    ``block`` entries (a Linear layer's inputs after flattening a (C, H, W) feature map).
    """

    key: str
    axis: int
    block: int = 1


class Piece(NamedTuple):
    """A sub-tensor of a state-dict entry: ``ranges[axis] = (start, stop)`` on every axis."""

    key: str
    ranges: tuple[tuple[int, int], ...]

    def index(self) -> tuple[slice, ...]:
        return tuple(slice(start, stop) for start, stop in self.ranges)


class Point(NamedTuple):
    """An activation point of a group: entries ``offset : offset + size * block`` of axis ``dim`` of the
    traced tensor ``node`` (the group's units, ``block`` entries each)."""

    node: str
    dim: int
    block: int = 1
    offset: int = 0


@dataclass
class PermutationSpec:
    """Permutation groups of a model.

    ``perm_to_axes[group]`` lists the entry axes a group acts on, ``sizes[group]`` its size, and
    ``axes_to_perm[entry]`` gives, for every entry, the group acting on each of its axes (``None`` where the
    axis is not permuted). An entry is a state-dict key, or, for a key whose axes are made of several
    segments, one of its ``pieces`` (``pieces[name] = Piece(key, ranges)``; the key itself is then not an
    entry, and the parts of it no piece covers are not permuted). :meth:`entries` gives a state dict's
    entries.
    """

    perm_to_axes: dict[str, list[AxisRef]]
    sizes: dict[str, int]
    axes_to_perm: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    # layer (module) name -> its state-dict keys, in model order; used for layer-wise analyses
    layers: dict[str, list[str]] = field(default_factory=dict)
    # group -> activation points (Point: fx node name, feature axis, block, offset) of every traced tensor with
    # that group's features that a Linear/Conv layer reads (used by activation matching)
    points: dict[str, list[Point]] = field(default_factory=dict)
    # piece name -> Piece(state-dict key, ranges): the entries of keys made of several segments
    pieces: dict[str, Piece] = field(default_factory=dict)
    # what algorithms derive from the spec alone and keep for the next call (weight matching's stack layouts,
    # keyed by the entries' shapes); not part of the spec's identity
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._blocks: dict[tuple[str, int], int] = {}
        for refs in self.perm_to_axes.values():
            for ref in refs:
                self._blocks[(ref.key, ref.axis)] = ref.block
        self.split: dict[str, list[str]] = {}  # state-dict key -> its pieces
        for name, piece in self.pieces.items():
            self.split.setdefault(piece.key, []).append(name)

    def block(self, key: str, axis: int) -> int:
        return self._blocks.get((key, axis), 1)

    @property
    def groups(self) -> list[str]:
        return list(self.perm_to_axes)

    @property
    def permuted_keys(self) -> set[str]:
        """State-dict keys some group acts on (directly or through a piece)."""
        keys = {k for k, axes in self.axes_to_perm.items() if any(g is not None for g in axes)}
        return {self.pieces[k].key if k in self.pieces else k for k in keys}

    def entries(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` as the spec's entries: keys made of pieces replaced by views of their pieces."""
        if not self.pieces:
            return state_dict
        out = {k: v for k, v in state_dict.items() if k not in self.split}
        for name, piece in self.pieces.items():
            if piece.key in state_dict:
                out[name] = state_dict[piece.key][piece.index()]
        return out

    def __repr__(self) -> str:
        lines = [f"PermutationSpec({len(self.perm_to_axes)} groups, {len(self.pieces)} pieces)"]
        for g, refs in self.perm_to_axes.items():
            axes = ", ".join(f"{r.key}[{r.axis}]" + (f"x{r.block}" if r.block > 1 else "") for r in refs)
            lines.append(f"  {g} (n={self.sizes[g]}): {axes}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# feature layouts and the union-find of groups

Seg = tuple[int, int, int]  # (group id, units, block): units × block consecutive entries; group 0 = fixed


def _entries(segs: Iterable[Seg]) -> int:
    return sum(units * block for _, units, block in segs)


def _bounds(segs: list[Seg]) -> set[int]:
    out, pos = set(), 0
    for _, units, block in segs:
        pos += units * block
        out.add(pos)
    return out


class _Groups:
    """Union-find over permutation groups with one distinguished FIXED element (0), where a group can also be
    restricted after the fact: *split* into consecutive sub-groups (``("split", [(sub-group, units), ...])``),
    or *coarsened* into a group permuting blocks of ``factor`` consecutive units (``("coarse", group,
    factor)``); every axis the group acts on is then acted on by those instead. Only leaves (groups without
    such a structure) are ever merged."""

    FIXED = 0

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.size: list[int] = [0]
        self.structure: list[tuple | None] = [None]
        self.origin: list[tuple[str, int, int]] = [("<fixed>", 0, 0)]  # (name, first unit, full size)

    def new(self, size: int, origin: str, lo: int = 0, full: int | None = None) -> int:
        """A new group of ``size`` units (FIXED if it has one: its only permutation is the identity)."""
        if size == 1:
            return self.FIXED
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.structure.append(None)
        self.origin.append((origin, lo, size if full is None else full))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def name(self, root: int) -> str:
        origin, lo, full = self.origin[root]
        size = self.size[root]
        return f"P_{origin}" if (lo, size) == (0, full) else f"P_{origin}[{lo}:{lo + size}]"

    def leaves(self, segs: Iterable[Seg]) -> list[Seg]:
        """``segs`` in terms of leaf roots, adjacent fixed runs merged (as ``(0, entries, 1)``)."""
        out: list[Seg] = []
        stack = list(reversed(list(segs)))
        while stack:
            g, units, block = stack.pop()
            root = self.find(g)
            structure = self.structure[root]
            if root == self.FIXED:
                n = units * block
                if out and out[-1][0] == self.FIXED:
                    out[-1] = (self.FIXED, out[-1][1] + n, 1)
                elif n:
                    out.append((self.FIXED, n, 1))
            elif structure is None:
                out.append((root, units, block))
            elif structure[0] == "split":
                stack.extend(reversed([(c, n, block) for c, n in structure[1]]))
            else:
                _, coarse, factor = structure
                stack.append((coarse, units // factor, block * factor))
        return out

    def permuted(self, segs: Iterable[Seg]) -> bool:
        return any(g != self.FIXED for g, _, _ in self.leaves(segs))

    def cut(self, segs: list[Seg], offsets: Iterable[int]) -> None:
        """Refine the groups of ``segs`` so that every entry offset in ``offsets`` is a boundary of leaves; a unit
        an offset falls inside of (a block cut in two) must stay in place, so it becomes a group of its own (one
        unit: fixed)."""
        offsets = sorted(set(offsets))
        while True:
            pos, changed = 0, False
            for g, units, block in self.leaves(segs):
                end = pos + units * block
                inside = [o for o in offsets if pos < o < end] if g != self.FIXED else []
                if inside:
                    unit, rest = divmod(inside[0] - pos, block)
                    self._split(g, unit if unit or not rest else 1)
                    changed = True
                    break
                pos = end
            if not changed:
                return

    def _split(self, root: int, unit: int) -> None:
        name, lo, full = self.origin[root]
        rest = self.size[root] - unit
        self.structure[root] = ("split", [(self.new(unit, name, lo, full), unit),
                                          (self.new(rest, name, lo + unit, full), rest)])

    def _coarsen(self, root: int, factor: int) -> None:
        name, lo, full = self.origin[root]
        self.structure[root] = ("coarse", self.new(self.size[root] // factor, name, lo // factor, full // factor),
                                factor)

    def sub(self, segs: list[Seg], start: int, stop: int) -> list[Seg]:
        """The layout of entries ``start:stop`` of ``segs`` (their groups refined at both ends)."""
        self.cut(segs, (start, stop))
        out, pos = [], 0
        for g, units, block in self.leaves(segs):
            end = pos + units * block
            lo, hi = max(pos, start), min(end, stop)
            if lo < hi:
                out.append((g, units, block) if g != self.FIXED else (self.FIXED, hi - lo, 1))
            pos = end
        return out

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        assert self.structure[ra] is None and self.structure[rb] is None, "only leaves are merged"
        assert not (ra and rb and self.size[ra] != self.size[rb]), "merging groups of different sizes"
        root, child = (ra, rb) if ra < rb else (rb, ra)  # FIXED (0) always wins; else the earliest names it
        self.parent[child] = root
        return root

    def fix(self, segs: Iterable[Seg]) -> None:
        for g, _, _ in self.leaves(segs):
            if g != self.FIXED:
                self.union(g, self.FIXED)

    def unify(self, a: list[Seg], b: list[Seg], where: str) -> None:
        """Make the layouts ``a`` and ``b`` of the same entries one: refine both at each other's boundaries, and
        merge the groups acting on the same entries (a group meeting fixed entries becomes fixed). Two groups
        whose units are blocks of different sizes there are coarsened to blocks of their least common
        multiple (or fixed, if their entries do not divide into such blocks)."""
        if _entries(self.leaves(a)) != _entries(self.leaves(b)):
            raise UnsupportedOperationError(f"{where} combines feature axes of {_entries(self.leaves(a))} and "
                                            f"{_entries(self.leaves(b))} entries")
        while True:
            while True:
                offsets = _bounds(self.leaves(a)) | _bounds(self.leaves(b))
                self.cut(a, offsets)
                self.cut(b, offsets)
                la, lb = self.leaves(a), self.leaves(b)
                if _bounds(la) | _bounds(lb) == offsets:
                    break
            restructured = False
            for (ga, ua, ba), (gb, ub, bb) in zip(la, lb):  # the same runs of entries, in order
                if ga != self.FIXED and gb != self.FIXED and ba != bb:
                    common = math.lcm(ba, bb)
                    if (ua * ba) % common:
                        self.fix([(ga, ua, ba), (gb, ub, bb)])
                    else:
                        for g, block in ((ga, ba), (gb, bb)):
                            if block != common:
                                self._coarsen(self.find(g), common // block)
                    restructured = True
                    break
                if ga != self.FIXED and gb != self.FIXED:
                    self.union(ga, gb)
                elif ga != self.FIXED or gb != self.FIXED:
                    self.union(ga or gb, self.FIXED)
            if not restructured:
                return


@dataclass
class _Feat:
    """What is known of one traced tensor: its feature axis ``dim`` and that axis's layout."""

    dim: int
    segs: list[Seg]


@dataclass(frozen=True)
class _Attr:
    """A state-dict entry read directly (``get_attr``), possibly reshaped by size-1 axes: ``axes[i]`` is the
    entry's axis that axis ``i`` of this value is (``None`` for an added size-1 axis)."""

    key: str
    axes: tuple[int | None, ...]


@dataclass(frozen=True)
class _Taint:
    """A value that depends on the permutation in a way no rule expresses (positions along a permuted axis)."""

    why: str


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Seq:
    items: tuple
    fields: tuple[str, ...] | None


class _Opaque:
    """A recorded value that is neither a tensor, a sequence nor a plain Python value."""


def _meta(value) -> Any:
    if isinstance(value, torch.Tensor):
        return _Tensor(tuple(value.shape))
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (tuple, list)):
        fields = getattr(type(value), "_fields", None) or getattr(type(value), "__match_args__", None)
        return _Seq(tuple(_meta(v) for v in value), tuple(fields) if fields else None)
    if value is None or isinstance(value, (int, float, bool, str, torch.dtype, torch.device, slice, type(...))):
        return value
    return _Opaque()


class _Recorder(fx.Interpreter):
    """Runs a traced graph and records what each node produced: tensors as their shapes, small values as they
    are (used to read shapes and arguments computed in the graph)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.meta: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.meta[n] = _meta(out)
        return out


def trace(model: nn.Module, training: bool = False) -> fx.GraphModule:
    """``model`` traced by ``torch.fx`` in training or evaluation mode (its modules' modes are restored).

    The graph of a mode is what that mode runs; activation matching reads the evaluation graph's nodes by
    the names :func:`permutation_spec` recorded there."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.train(training)
        return fx.symbolic_trace(model)
    finally:
        for m, mode in modes.items():
            m.training = mode


# --------------------------------------------------------------------------------------------------
# operation tables (names of torch functions, Tensor methods and operators; see _op_name)

_ELEMENTWISE = {
    # arithmetic and comparisons (any number of broadcast operands)
    "add", "add_", "iadd", "sub", "sub_", "isub", "subtract", "rsub", "mul", "mul_", "imul", "multiply", "truediv",
    "itruediv", "div", "div_", "divide", "true_divide", "floordiv", "ifloordiv", "floor_divide", "mod", "imod",
    "remainder", "fmod", "pow", "pow_", "ipow", "float_power", "neg", "neg_", "pos", "abs", "abs_", "absolute",
    "maximum", "minimum", "fmax", "fmin", "where", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max",
    "clamp_min_", "clamp_max_", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "masked_fill",
    "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_", "logical_and",
    "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "copy_",
    "atan2",
    # element-wise functions
    "exp", "exp_", "expm1", "exp2", "log", "log_", "log1p", "log2", "log10", "sqrt", "sqrt_", "rsqrt", "square",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "tanh_", "asinh", "acosh", "atanh",
    "sigmoid", "sigmoid_", "logit", "erf", "erfc", "erfinv", "reciprocal", "sign", "sgn", "floor", "ceil", "round",
    "trunc", "frac", "isnan", "isinf", "isfinite", "nan_to_num", "fill_", "zero_",
    # activations
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "selu_", "celu", "gelu", "silu", "silu_", "mish", "hardswish",
    "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "softplus",
    "softsign", "tanhshrink", "hardshrink", "softshrink", "logsigmoid", "threshold", "threshold_", "rrelu",
    # dropout and stochastic depth (a random mask or a per-sample scale)
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "stochastic_depth",
    # equivariant along any axis: a permutation of the axis permutes the result alike
    "softmax", "log_softmax", "softmin", "normalize",
    # copies and casts
    "contiguous", "clone", "detach", "detach_", "requires_grad_", "float", "double", "half", "bfloat16", "int",
    "long", "bool", "type", "cpu", "cuda",
}
_CASTS = {"to", "type_as"}  # element-wise on their first argument; a tensor argument only gives a dtype/device
_REDUCTIONS = {  # name -> (position of `dim`, its default, what it returns)
    **{n: (1, None, "value") for n in ("mean", "sum", "nansum", "nanmean", "prod", "amax", "amin", "all", "any",
                                       "count_nonzero", "logsumexp", "std", "var")},
    "norm": (2, None, "value"), "vector_norm": (2, None, "value"),
    **{n: (1, None, "values_indices") for n in ("max", "min", "median", "nanmedian")},
    "mode": (1, -1, "values_indices"), "kthvalue": (2, -1, "values_indices"),
    "argmax": (1, None, "indices"), "argmin": (1, None, "indices"),
    "aminmax": (1, None, "values_values"), "std_mean": (1, None, "values_values"),
    "var_mean": (1, None, "values_values"),
}
_ORDERS = {"topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "msort": (None, 0)}  # (dim position, default)
_SCANS = {"cumsum": 1, "cumprod": 1, "logcumsumexp": 1, "cummax": 1, "cummin": 1}  # order-dependent along dim
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}
_EXPANDS = {"expand", "expand_as", "broadcast_to"}
_REPEATS = {"repeat", "tile"}
_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "adjoint"}
_SPLITS = {"chunk": 2, "split": 2, "tensor_split": 2, "split_with_sizes": 2, "unbind": 1}  # dim position
_SPATIAL = {  # functions acting on the last k axes (pooling, resampling)
    **{f"{kind}pool{k}d": k for k in (1, 2, 3) for kind in ("max_", "avg_", "adaptive_avg_", "adaptive_max_",
                                                              "lp_", "fractional_max_")},
    **{f"max_pool{k}d_with_indices": k for k in (1, 2, 3)},
    "interpolate": None, "upsample": None, "upsample_nearest": None, "upsample_bilinear": None,
}
_SHAPE_QUERIES = {"size", "dim", "numel", "nelement", "ndimension", "is_contiguous", "is_floating_point",
                  "get_device"}
_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}
_INPLACE_RESHAPES = {"squeeze_", "unsqueeze_", "t_", "transpose_", "resize_", "resize_as_", "as_strided_",
                     "swapaxes_", "swapdims_"}
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow"}
_LAYERS = {"linear", "conv1d", "conv2d", "conv3d", "layer_norm", "group_norm", "batch_norm", "instance_norm",
           "rms_norm", "prelu", "embedding"}

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardshrink,
    nn.Softshrink, nn.LogSigmoid, nn.Threshold, nn.RReLU, nn.Identity, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.Softmax2d,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_POOL_MODULES = {
    **{getattr(nn, f"{kind}Pool{k}d"): k for k in (1, 2, 3) for kind in ("Max", "Avg", "AdaptiveAvg", "AdaptiveMax")},
    nn.LPPool1d: 1, nn.LPPool2d: 2, nn.FractionalMaxPool2d: 2, nn.FractionalMaxPool3d: 3, nn.Upsample: None,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}


def _op_name(node: fx.Node) -> str | None:
    """The operation's name for a call_method or call_function node, or None for a function the tables do not
    describe (a user's own wrapped function)."""
    if node.op == "call_method":
        return node.target
    target = node.target
    if target is getattr:
        return "getattr"
    module = getattr(target, "__module__", None) or ""
    if module.split(".")[0] in ("_operator", "operator", "torch", "torchvision"):
        return getattr(target, "__name__", None)
    return None


def _arg(node: fx.Node, index: int | None, name: str, default=None):
    if index is not None and len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --------------------------------------------------------------------------------------------------
# derivation

@dataclass
class _Box:
    """Part of a claimed entry: ``ranges`` on every axis, and the layout of each axis there (None: fixed)."""

    ranges: tuple[tuple[int, int], ...]
    axes: tuple[list[Seg] | None, ...]


class _Derivation:
    """The state of one derivation: groups, the layouts claimed for state-dict entries, layers and points."""

    def __init__(self, model: nn.Module):
        self.model = model
        entries = model.state_dict(keep_vars=True)
        self.shapes = {k: tuple(v.shape) for k, v in entries.items()}
        # keys of one tensor (tied weights): claims on any of them are claims on the first
        first: dict[int, str] = {}
        self.alias = {k: first.setdefault(id(v), k) for k, v in entries.items()}
        self.groups = _Groups()
        self.claims: dict[str, list[_Box]] = {}
        self.layers: dict[str, list[str]] = {}
        self.points: dict[tuple[str, int], list[Seg]] = {}

    # ---- messages

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.modules[node.target]).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({node.op} {target})"

    def where(self, node: fx.Node) -> str:
        return f"cannot derive a permutation spec for {type(self.model).__name__}: {self.describe(node)}"

    def refuse(self, node: fx.Node, why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"cannot derive a permutation spec for {type(self.model).__name__}: {self.describe(node)} {why}")

    # ---- values

    def shape(self, arg) -> tuple[int, ...] | None:
        meta = self.meta.get(arg) if isinstance(arg, fx.Node) else None
        return meta.shape if isinstance(meta, _Tensor) else None

    def concrete(self, arg):
        """``arg`` with every node replaced by the plain value it produced (tensors stay markers)."""
        return fx.node.map_arg(arg, lambda n: self.meta.get(n))

    def value(self, arg):
        return self.feats.get(arg) if isinstance(arg, fx.Node) else None

    def permuted(self, value) -> _Feat | None:
        """``value`` if it is a tensor with permuted features, else None."""
        if isinstance(value, _Feat) and self.groups.permuted(value.segs):
            return value
        return None

    def deep(self, value) -> Iterable:
        if isinstance(value, (tuple, list)):
            for v in value:
                yield from self.deep(v)
        else:
            yield value

    def inputs(self, node: fx.Node) -> list:
        """Every value this node reads (tuple values flattened)."""
        return [v for n in node.all_input_nodes for v in self.deep(self.feats.get(n))]

    # ---- claims on state-dict entries

    def claim(self, key: str, boxes: list[_Box], where: str) -> None:
        """Record how ``key``'s axes are laid out; a second claim (a shared weight, the other trace) must agree
        and is made one with the first. A claim of all-fixed axes fixes whatever the other claimed."""
        key = self.alias[key]
        shape = self.shapes[key]
        for box in boxes:
            for axis, segs in enumerate(box.axes):
                if segs is not None and _entries(self.groups.leaves(segs)) != box.ranges[axis][1] - box.ranges[axis][0]:
                    raise UnsupportedOperationError(f"{where}: '{key}' axis {axis} has {shape[axis]} entries, not "
                                                    f"the {_entries(segs)} of the features it meets")
        old = self.claims.get(key)
        if old is None:
            self.claims[key] = boxes
            return
        fixed_old = all(s is None for box in old for s in box.axes)
        fixed_new = all(s is None for box in boxes for s in box.axes)
        if fixed_old or fixed_new:
            for box in boxes if fixed_old else old:
                for segs in box.axes:
                    if segs is not None:
                        self.groups.fix(segs)
            if fixed_old:
                self.claims[key] = boxes
            return
        if [b.ranges for b in old] != [b.ranges for b in boxes]:
            raise UnsupportedOperationError(f"{where} uses '{key}' in a way its other use cannot share")
        for box_old, box_new in zip(old, boxes):
            for axis, (a, b) in enumerate(zip(box_old.axes, box_new.axes)):
                if a is None and b is not None:
                    self.groups.fix(b)
                elif b is None and a is not None:
                    self.groups.fix(a)
                elif a is not None:
                    self.groups.unify(a, b, f"{where} ('{key}' axis {axis})")

    def claim_axes(self, key: str | None, axes: dict[int, list[Seg] | None], where: str) -> None:
        """Claim one layout per axis of the whole entry ``key`` (axes not named are fixed)."""
        if key is None:
            return
        shape = self.shapes[key]
        self.claim(key, [_Box(tuple((0, n) for n in shape), tuple(axes.get(a) for a in range(len(shape))))], where)

    def claim_fixed(self, key: str, where: str) -> None:
        self.claim_axes(key, {}, where)

    def module_keys(self, name: str, known: Iterable[str], node: fx.Node) -> dict[str, str | None]:
        """``{local name: state-dict key or None}`` for the parameters and buffers ``known`` to a layer's rule;
        refuses a module holding any other entry (a parametrization, weight norm: its weight is not a parameter
        the rule could permute)."""
        prefix = f"{name}." if name else ""
        known = tuple(known)
        extra = [k for k in self.shapes if k.startswith(prefix) and k[len(prefix):] not in known]
        if extra:
            raise self.refuse(node, f"holds entries the derivation does not know ({', '.join(extra[:3])})")
        keys = {n: (prefix + n if prefix + n in self.shapes else None) for n in known}
        self.layers.setdefault(name, [k for k in self.shapes if k.startswith(prefix)])
        return keys

    # ---- the graph

    def run(self, gm: fx.GraphModule, example: torch.Tensor, record_points: bool) -> None:
        self.gm, self.modules, self.record_points = gm, dict(gm.named_modules()), record_points
        modes = {m: m.training for m in gm.modules()}
        devices = [example.device] if example.device.type == "cuda" else []
        try:
            gm.eval()
            recorder = _Recorder(gm)
            # the training graph may draw random numbers (dropout, stochastic depth): leave the caller's RNG alone
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                recorder.run(example)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise UnsupportedOperationError(f"cannot derive a permutation spec for {type(self.model).__name__}: "
                                            f"running its traced graph failed ({type(exc).__name__}: {exc})") from exc
        finally:
            for m, mode in modes.items():
                m.training = mode
        self.meta = recorder.meta
        self.feats: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            self.feats[node] = self.node(node)

    def node(self, node: fx.Node):
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            shape = self.shapes.get(node.target)
            return _Attr(node.target, tuple(range(len(shape)))) if shape is not None else None
        if node.op == "call_function" and node.target in (operator.getitem, getattr) and not isinstance(
                self.meta.get(node.args[0]), _Tensor):
            return self.select(node)  # one element of a tuple: only that element must be usable
        for v in self.inputs(node):
            if isinstance(v, _Taint):
                raise self.refuse(node, f"uses {v.why}")
        if node.op == "output":
            for v in self.inputs(node):
                if isinstance(v, _Feat):
                    self.groups.fix(v.segs)
                elif isinstance(v, _Attr):
                    self.claim_fixed(v.key, self.where(node))
            return None
        self.used: set[str] = set()  # attributes the rule gave a layout to
        out = self.call_module(node) if node.op == "call_module" else self.call(node)
        for v in self.inputs(node):  # a parameter read any other way stays fixed
            if isinstance(v, _Attr) and v.key not in self.used:
                self.claim_fixed(v.key, self.where(node))
        self.check(node, out, self.meta.get(node))
        return out

    def check(self, node: fx.Node, value, meta) -> None:
        """What a rule says of a node must fit what the node produced: a layout on an axis the tensor has,
        covering exactly that axis's entries; a tuple for a tuple. (A safety net under every rule.)"""
        if value is None:
            return
        if isinstance(value, tuple):
            fits = isinstance(meta, _Seq) and len(meta.items) == len(value)
            if fits:
                for v, m in zip(value, meta.items):
                    self.check(node, v, m)
                return
        elif isinstance(value, _Feat):
            fits = isinstance(meta, _Tensor) and 0 <= value.dim < len(meta.shape) and _entries(
                self.groups.leaves(value.segs)) == meta.shape[value.dim]
        else:
            fits = isinstance(meta, _Tensor)
        if not fits:  # pragma: no cover - a rule's error, never a model's
            raise self.refuse(node, f"got a layout ({value}) that does not fit its output ({meta}): a derivation "
                              "error, please report it")

    def select(self, node: fx.Node):
        container, index = self.value(node.args[0]), self.concrete(node.args[1])
        meta = self.meta.get(node.args[0])
        if node.target is getattr:
            if isinstance(meta, _Seq) and meta.fields and index in meta.fields:
                index = meta.fields.index(index)
            else:
                return None  # an attribute of a non-tensor value
        if not isinstance(container, (tuple, list)):
            return None
        try:
            return container[index]
        except (TypeError, IndexError):  # pragma: no cover - fx ran the same index on the real value
            raise self.refuse(node, f"indexes a sequence with {index!r}") from None

    def unknown(self, node: fx.Node, why: str = "is an operation the derivation does not know"):
        if any(self.permuted(v) for v in self.inputs(node)):
            raise self.refuse(node, why)
        return None

    # ---- call_module

    def call_module(self, node: fx.Node):
        mod, name = self.modules[node.target], node.target
        x_arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        x = self.value(x_arg)
        xf = self.permuted(x)
        where = self.where(node)
        in_shape = self.shape(x_arg)
        if isinstance(mod, nn.Linear):
            keys = self.module_keys(name, ("weight", "bias"), node)
            return self.linear(node, x_arg, keys["weight"], keys["bias"], mod.out_features, name)
        if isinstance(mod, nn.modules.conv._ConvNd):
            keys = self.module_keys(name, ("weight", "bias"), node)
            transposed = isinstance(mod, nn.modules.conv._ConvTransposeMixin)
            return self.conv(node, x_arg, keys["weight"], keys["bias"], mod.in_channels, mod.out_channels,
                             mod.groups, transposed, len(mod.kernel_size), name)
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or (
                hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm)):
            known = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            keys = self.module_keys(name, known, node)
            if isinstance(mod, nn.modules.batchnorm._NormBase):
                channel = 0 if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and in_shape is not None and \
                    len(in_shape) == int(type(mod).__name__[-2]) + 1 else 1
                return self.per_channel(node, x, channel, [keys.get(k) for k in known[:4]])
            if isinstance(mod, nn.GroupNorm):
                return self.group_norm(node, x, mod.num_groups, keys.get("weight"), keys.get("bias"))
            return self.layer_norm(node, x, tuple(mod.normalized_shape), keys.get("weight"), keys.get("bias"))
        if isinstance(mod, nn.PReLU):
            keys = self.module_keys(name, ("weight",), node)
            return self.prelu(node, x, keys["weight"])
        if isinstance(mod, nn.Embedding):
            keys = self.module_keys(name, ("weight",), node)
            return self.embedding(node, x, keys["weight"], mod.embedding_dim, name)
        if isinstance(mod, nn.GLU):
            return self.glu(node, x, mod.dim)
        if isinstance(mod, nn.MultiheadAttention):
            return self.attention(node, mod, name)
        if isinstance(mod, (*_ACTIVATION_MODULES, *_DROPOUT_MODULES)):
            if any(True for _ in mod.parameters(recurse=False)):  # pragma: no cover - none of these has any
                raise self.refuse(node, "has parameters the derivation does not know")
            return self.elementwise(node, [x_arg])
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        if type(mod) in _POOL_MODULES:
            return self.spatial(node, x, _POOL_MODULES[type(mod)])
        if isinstance(mod, nn.ChannelShuffle) and xf:
            raise self.refuse(node, "interleaves the channels of its groups, which no block or segment "
                              "permutation of the groups expresses")
        # any other layer: only on fixed inputs, and then its entries stay fixed
        if any(self.permuted(v) for v in self.inputs(node)):
            raise self.refuse(node, "is not a layer the derivation knows")
        prefix = f"{name}." if name else ""
        for key in self.shapes:
            if key.startswith(prefix):
                self.claim_fixed(key, where)
        return None

    # ---- layers (modules and their functional forms)

    def point(self, arg, feat: _Feat | None) -> None:
        if self.record_points and feat is not None and isinstance(arg, fx.Node):
            self.points[(arg.name, feat.dim)] = feat.segs

    def linear(self, node, x_arg, weight: str | None, bias: str | None, out_features: int, origin: str):
        x = self.permuted(self.value(x_arg))
        shape = self.shape(x_arg)
        if x is not None and x.dim != len(shape) - 1:
            raise self.refuse(node, f"reads features on axis {len(shape) - 1}, but they are on axis {x.dim}")
        self.point(x_arg, x)
        gout = self.groups.new(out_features, origin)
        out = [(gout, out_features, 1)]
        where = self.where(node)
        self.claim_axes(weight, {0: out, 1: x.segs if x else None}, where)
        self.claim_axes(bias, {0: out}, where)
        return _Feat(len(self.shape(node)) - 1, out)

    def conv(self, node, x_arg, weight, bias, c_in: int, c_out: int, groups: int, transposed: bool, spatial: int,
             origin: str):
        x = self.permuted(self.value(x_arg))
        shape = self.shape(x_arg)
        channel = len(shape) - spatial - 1
        where = self.where(node)
        if x is not None and x.dim != channel:
            raise self.refuse(node, f"reads channels on axis {channel}, but the features are on axis {x.dim}")
        self.point(x_arg, x)
        if groups == 1:
            gout = self.groups.new(c_out, origin)
            out = [(gout, c_out, 1)]
            ins = x.segs if x else None
            self.claim_axes(weight, {0: ins, 1: out} if transposed else {0: out, 1: ins}, where)
            self.claim_axes(bias, {0: out}, where)
            return _Feat(channel, out)
        if transposed:
            raise self.refuse(node, f"is a grouped transposed convolution (groups={groups}), which is not supported")
        per_in, per_out = c_in // groups, c_out // groups
        if per_in == 1 and x is not None:
            # depthwise (one input channel per group): the input's groups act on the output channels too, each
            # input unit's channels followed by their `per_out` outputs (blocks, for a channel multiplier)
            out = [(g, units, block * per_out) for g, units, block in self.groups.leaves(x.segs)]
            self.claim_axes(weight, {0: out}, where)
            self.claim_axes(bias, {0: out}, where)
            return _Feat(channel, out)
        # groups of several input channels: permute within each group (the input's layout cut at the groups'
        # boundaries; each group's output channels a group of its own)
        ins = x.segs if x is not None else [(0, c_in, 1)]
        self.groups.cut(ins, range(per_in, c_in, per_in))
        outs = [self.groups.new(per_out, origin, g * per_out, c_out) for g in range(groups)]
        if weight is not None:
            w_shape = self.shapes[weight]
            rest = tuple((0, n) for n in w_shape[2:])
            boxes = [_Box(((g * per_out, (g + 1) * per_out), (0, per_in), *rest),
                          ([(outs[g], per_out, 1)], self.groups.sub(ins, g * per_in, (g + 1) * per_in),
                           *[None] * len(rest)))
                     for g in range(groups)]
            self.claim(weight, boxes, where)
        out = [(g, per_out, 1) for g in outs]
        self.claim_axes(bias, {0: out}, where)
        return _Feat(channel, out)

    def per_channel(self, node, x, channel: int, keys: list[str | None]):
        """A layer acting on each channel alone (BatchNorm, InstanceNorm): its per-channel entries follow."""
        xf = self.permuted(x)
        if xf is not None and xf.dim != channel:
            raise self.refuse(node, f"normalises channels on axis {channel}, but the features are on axis {xf.dim}")
        for key in keys:
            if key is not None and self.shapes[key]:
                self.claim_axes(key, {0: xf.segs if xf else None}, self.where(node))
            elif key is not None:
                self.claim_fixed(key, self.where(node))
        return x

    def layer_norm(self, node, x, normalized: tuple[int, ...], weight, bias):
        """LayerNorm over the last ``len(normalized)`` axes: equivariant; its weight and bias follow the features
        if they lie among those axes."""
        xf = self.permuted(x)
        ndim = len(self.shape(node))
        axes = {}
        if xf is not None and xf.dim >= ndim - len(normalized):
            axes = {xf.dim - (ndim - len(normalized)): xf.segs}
        self.claim_axes(weight, axes, self.where(node))
        self.claim_axes(bias, axes, self.where(node))
        return x

    def group_norm(self, node, x, num_groups: int, weight, bias):
        """GroupNorm: statistics over each group of consecutive channels; channels may only move within their
        group (the layout is cut at the groups' boundaries), unless there is one group, or one per channel."""
        xf = self.permuted(x)
        if xf is not None and xf.dim != 1:
            raise self.refuse(node, f"normalises channels on axis 1, but the features are on axis {xf.dim}")
        if xf is not None:
            channels = _entries(self.groups.leaves(xf.segs))
            if 1 < num_groups < channels:
                step = channels // num_groups
                self.groups.cut(xf.segs, range(step, channels, step))
        self.claim_axes(weight, {0: xf.segs} if xf else {}, self.where(node))
        self.claim_axes(bias, {0: xf.segs} if xf else {}, self.where(node))
        return x

    def prelu(self, node, x, weight):
        xf = self.permuted(x)
        channel = 1 if len(self.shape(node)) >= 2 else 0
        if weight is not None and self.shapes[weight] != (1,):
            if xf is not None and xf.dim != channel:
                raise self.refuse(node, f"scales channels on axis {channel}, but the features are on axis {xf.dim}")
            self.claim_axes(weight, {0: xf.segs if xf else None}, self.where(node))
        elif weight is not None:
            self.claim_fixed(weight, self.where(node))
        return x

    def embedding(self, node, x, weight, dim: int, origin: str):
        if self.permuted(x):
            raise self.refuse(node, "looks up rows by indices that depend on the permuted features")
        gout = self.groups.new(dim, origin)
        out = [(gout, dim, 1)]
        self.claim_axes(weight, {1: out}, self.where(node))
        return _Feat(len(self.shape(node)) - 1, out)

    def glu(self, node, x, dim: int):
        xf = self.permuted(x)
        shape = self.shape(node.args[0])
        dim %= len(shape)
        if xf is None or xf.dim != dim:
            return self.elementwise(node, [node.args[0]], out_shape=shape)
        half = shape[dim] // 2
        where = self.where(node)
        first, second = self.groups.sub(xf.segs, 0, half), self.groups.sub(xf.segs, half, 2 * half)
        self.groups.unify(first, second, where)
        return _Feat(dim, first)

    def attention(self, node: fx.Node, mod: nn.MultiheadAttention, name: str):
        """nn.MultiheadAttention: within each head, the query and key channels may be permuted together (their
        dot products stay), and the value channels together with the output projection's inputs; the inputs'
        features are read by the projections' columns, and the output projection starts a new group. (Heads
        could also be permuted as blocks; that symmetry is not used.) The attention weights returned are
        unchanged."""
        known = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                 "bias_v", "out_proj.weight", "out_proj.bias")
        keys = self.module_keys(name, known, node)
        args = [_arg(node, i, kw) for i, kw in enumerate(("query", "key", "value"))]
        feats = [self.permuted(self.value(a)) for a in args]
        shapes = [self.shape(a) for a in args]
        for f, shape in zip(feats, shapes):
            if f is not None and f.dim != len(shape) - 1:
                raise self.refuse(node, f"reads features on axis {len(shape) - 1}, but they are on axis {f.dim}")
        for extra in self.tensor_args(node)[3:]:
            if self.permuted(self.value(extra)) is not None:
                raise self.refuse(node, "takes a mask with permuted features")
        where = self.where(node)
        heads, width = mod.num_heads, mod.head_dim
        qk = [self.groups.new(width, f"{name}.qk", h * width, mod.embed_dim) for h in range(heads)]
        v = [self.groups.new(width, f"{name}.v", h * width, mod.embed_dim) for h in range(heads)]
        qk_segs, v_segs = [(g, width, 1) for g in qk], [(g, width, 1) for g in v]
        ins = [f.segs if f is not None else None for f in feats]
        if keys["in_proj_weight"] is not None:  # one packed projection: q, k and v read the same columns
            present = [segs for segs in ins if segs is not None]
            for segs in present[1:]:
                self.groups.unify(present[0], segs, where)
            if present and len(present) < 3:
                self.groups.fix(present[0])  # a fixed input shares the columns
            self.claim_axes(keys["in_proj_weight"], {0: qk_segs + qk_segs + v_segs,
                                                     1: present[0] if len(present) == 3 else None}, where)
        else:
            for key, rows, cols in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), (qk, qk, v), ins):
                self.claim_axes(keys[key], {0: [(g, width, 1) for g in rows], 1: cols}, where)
        self.claim_axes(keys["in_proj_bias"], {0: qk_segs + qk_segs + v_segs}, where)
        self.claim_axes(keys["bias_k"], {2: qk_segs}, where)
        self.claim_axes(keys["bias_v"], {2: v_segs}, where)
        self.point(args[0], feats[0])
        gout = self.groups.new(mod.embed_dim, f"{name}.out_proj")
        out = [(gout, mod.embed_dim, 1)]
        self.claim_axes(keys["out_proj.weight"], {0: out, 1: v_segs}, where)
        self.claim_axes(keys["out_proj.bias"], {0: out}, where)
        return (_Feat(len(self.shape(args[0])) - 1, out), None)

    def functional_layer(self, node, name: str):
        """``F.linear``, ``F.conv*d``, ``F.*_norm``, ``F.prelu``, ``F.embedding``: as their modules, with the
        parameters given as arguments (they must be the model's own entries, read directly)."""
        def key(index, kw):
            arg = _arg(node, index, kw)
            v = self.value(arg)
            if arg is None:
                return None
            if isinstance(v, _Attr) and v.axes == tuple(range(len(self.shapes[v.key]))):
                self.used.add(v.key)
                return v.key
            if any(self.permuted(u) for u in self.inputs(node)):
                raise self.refuse(node, f"takes its {kw} from a computed tensor, which no permutation can follow")
            return _COMPUTED
        x_arg = node.args[0]
        x = self.value(x_arg)
        origin = node.name
        if name == "linear":
            w, b = key(1, "weight"), key(2, "bias")
            if _COMPUTED in (w, b):
                return None
            self.layers.setdefault(origin, [k for k in (w, b) if k])
            return self.linear(node, x_arg, w, b, self.shapes[w][0], w.rsplit(".", 1)[0] if "." in w else w)
        if name.startswith("conv"):
            w, b = key(1, "weight"), key(2, "bias")
            if _COMPUTED in (w, b):
                return None
            groups = self.concrete(_arg(node, 6, "groups", 1))
            c_out, per_in = self.shapes[w][:2]
            self.layers.setdefault(origin, [k for k in (w, b) if k])
            return self.conv(node, x_arg, w, b, per_in * groups, c_out, groups, False, int(name[4]),
                             w.rsplit(".", 1)[0] if "." in w else w)
        if name == "layer_norm" or name == "rms_norm":
            normalized = self.concrete(_arg(node, 1, "normalized_shape"))
            normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
            w, b = key(2, "weight"), key(3, "bias") if name == "layer_norm" else None
            if _COMPUTED in (w, b):
                return None
            return self.layer_norm(node, x, normalized, w, b)
        if name == "group_norm":
            w, b = key(2, "weight"), key(3, "bias")
            if _COMPUTED in (w, b):
                return None
            return self.group_norm(node, x, int(self.concrete(_arg(node, 1, "num_groups"))), w, b)
        if name in ("batch_norm", "instance_norm"):
            keys = [key(i, kw) for i, kw in enumerate(("running_mean", "running_var", "weight", "bias"), 1)]
            if _COMPUTED in keys:
                return None
            return self.per_channel(node, x, 1, keys)
        if name == "prelu":
            w = key(1, "weight")
            return None if w is _COMPUTED else self.prelu(node, x, w)
        w = key(1, "weight")  # embedding(input, weight)
        if w is _COMPUTED:
            return None
        return self.embedding(node, x, w, self.shapes[w][1], w.rsplit(".", 1)[0] if "." in w else w)

    # ---- call_function / call_method

    def call(self, node: fx.Node):
        if isinstance(node.target, type) and issubclass(node.target, tuple):  # a (named) tuple built in the graph
            return tuple(self.value(a) for a in [*node.args, *node.kwargs.values()])
        name = _op_name(node)
        if name is None:
            return self.unknown(node, "is a function the derivation does not know")
        x_arg = node.args[0] if node.args else None
        x = self.value(x_arg)
        out_meta = self.meta.get(node)
        if name in _SHAPE_QUERIES or (name == "getattr" and node.args[1] in _ATTRIBUTES):
            return None
        if name in _INPLACE_RESHAPES:
            return self.unknown(node, "changes the shape of a tensor in place")
        if not isinstance(out_meta, (_Tensor, _Seq)):
            return self.unknown(node, "turns permuted features into a value that is not a tensor")
        if (name in _ELEMENTWISE or name in _CASTS) and isinstance(out_meta, _Tensor):
            unary = name in ("softmax", "log_softmax", "softmin", "normalize") or name in _CASTS
            out = self.elementwise(node, [x_arg] if unary else self.tensor_args(node))
            if (name.endswith("_") or name in _INPLACE_OPERATORS) and out is not None and self.permuted(x) is None \
                    and not (isinstance(x, _Attr) and x.key in self.used):
                # the tensor written into (and any view of it, or tensor it views) would change its features
                raise self.refuse(node, "writes permuted features in place into a fixed tensor")
            return out
        if name in _LAYERS:
            return self.functional_layer(node, name)
        if name in ("cat", "concat", "concatenate", "stack"):
            return self.cat(node) if name != "stack" else self.stack(node)
        shape_only = {"view_as", "reshape_as", "expand_as"}
        for other in self.tensor_args(node)[1:]:  # the rules below read their first argument's features only
            if self.permuted(self.value(other)) is not None and name not in shape_only:
                raise self.refuse(node, "takes permuted features in an argument the derivation cannot follow")
        if name == "glu":
            return self.glu(node, x, int(self.concrete(_arg(node, 1, "dim", -1))))
        if name in ("max", "min") and isinstance(self.meta.get(_arg(node, 1, "other")), _Tensor):
            return self.elementwise(node, self.tensor_args(node))
        if name in _REDUCTIONS:
            return self.reduce(node, name)
        if name in _ORDERS:
            return self.order(node, name)
        if name in _SCANS:
            return self.scan(node, name)
        if name in _RESHAPES:
            return self.reshape(node, x)
        if name in _EXPANDS:
            return self.expand(node, x)
        if name in _REPEATS:
            return self.repeat(node, x)
        if name in _MOVES or (name == "getattr" and node.args[1] in ("T", "mT", "H", "mH")):
            return self.move(node, x, name)
        if name == "getitem":
            return self.index(node, x)
        if name in ("narrow", "select"):
            return self.narrow(node, x, name)
        if name in _SPLITS:
            return self.split(node, x, name)
        if name == "pad":
            return self.pad(node, x)
        if name in _SPATIAL:
            return self.spatial(node, x, _SPATIAL[name])
        if name in ("flip", "roll", "index_select", "gather", "take_along_dim", "repeat_interleave"):
            return self.along(node, x, name)
        if name in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
            return None  # values independent of the features'
        if name == "getattr" and node.args[1] == "data":
            return x
        return self.unknown(node)

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        out = []
        for a in [*node.args, *node.kwargs.values()]:
            for n in (a if isinstance(a, (tuple, list)) else [a]):
                if isinstance(n, fx.Node) and isinstance(self.meta.get(n), _Tensor):
                    out.append(n)
        return out

    def elementwise(self, node: fx.Node, operands: list, out_shape: tuple[int, ...] | None = None):
        """Element-wise over broadcast operands: the permuted ones must have their features on one output axis,
        and their layouts are made one; a model parameter spanning that axis follows it; any other fixed
        tensor spanning it fixes the features."""
        out_shape = self.shape(node) if out_shape is None else out_shape
        where = self.where(node)
        n_out = len(out_shape)
        located = []  # (value, shape, offset)
        for arg in operands:
            shape = self.shape(arg)
            if shape is not None:
                located.append((self.value(arg), shape, n_out - len(shape)))
        dims = {f.dim + off for v, s, off in located if (f := self.permuted(v)) is not None and s[f.dim] > 1}
        for v, s, off in located:  # a permuted axis of one entry is no permutation; fix it
            f = self.permuted(v)
            if f is not None and s[f.dim] == 1 and out_shape[f.dim + off] > 1:
                self.groups.fix(f.segs)
        if len(dims) > 1:
            raise self.refuse(node, f"combines tensors whose features lie on different axes {sorted(dims)}")
        if not dims:
            return None
        dim = dims.pop()
        segs = None
        for v, _, off in located:
            f = self.permuted(v)
            if f is not None and f.dim + off == dim:
                if segs is None:
                    segs = f.segs
                else:
                    self.groups.unify(segs, f.segs, where)
        for v, s, off in located:
            if self.permuted(v) is not None or dim - off < 0 or s[dim - off] == 1:
                continue
            if isinstance(v, _Attr):
                param_axis = v.axes[dim - off]
                self.claim_axes(v.key, {param_axis: segs}, where)
                self.used.add(v.key)
            else:  # a fixed tensor multiplying or adding to each feature: the features must stay
                self.groups.fix(segs)
        return _Feat(dim, segs)

    def dims(self, node, index, name, default, ndim) -> list[int] | None:
        """The axes an operation's ``dim`` argument names (at position ``index`` or keyword ``name``/``axis``),
        non-negative and sorted; None where it names none (all axes)."""
        if index is not None:
            default = node.kwargs.get("axis", default)
        dims = self.concrete(_arg(node, index, name, default) if index is not None else default)
        if dims is None or dims == []:
            return None if dims is None else []
        dims = [dims] if isinstance(dims, int) else list(dims)
        return sorted(d % ndim for d in dims) if ndim else [0]

    def reduce(self, node: fx.Node, name: str):
        """Reductions: over other axes the layout stays (moved if the axes go); over the feature axis the
        values are invariant (any permutation of the reduced entries gives them) and positions are tainted."""
        index, default, returns = _REDUCTIONS[name]
        x = self.permuted(self.value(node.args[0]))
        if x is None:
            return None
        in_shape = self.shape(node.args[0])
        dims = self.dims(node, index, "dim", default, len(in_shape))
        if dims == []:  # an empty dim list reduces all axes in some functions, none in others: refuse it
            raise self.refuse(node, "reduces over an empty list of axes")
        if dims is None or x.dim in dims:
            if returns in ("value", "values_values") or (dims is None and returns == "values_indices"):
                return None  # (max, min, median without a dim: one value)
            taint = _Taint(f"positions along the permuted features found by {self.describe(node)}")
            return taint if returns == "indices" else (None, taint)
        out_meta = self.meta.get(node)
        out_shape = out_meta.shape if isinstance(out_meta, _Tensor) else out_meta.items[0].shape
        keepdim = len(out_shape) == len(in_shape)
        feat = _Feat(x.dim if keepdim else x.dim - sum(d < x.dim for d in dims), x.segs)
        return feat if returns in ("value", "indices") else (feat, feat)

    def order(self, node: fx.Node, name: str):
        index, default = _ORDERS[name]
        x = self.permuted(self.value(node.args[0]))
        if x is None:
            return None
        in_shape = self.shape(node.args[0])
        dim = self.dims(node, index, "dim", default, len(in_shape))[0]
        if dim == x.dim:
            taint = _Taint(f"positions along the permuted features found by {self.describe(node)}")
            if name == "topk" and not self.concrete(_arg(node, 4, "sorted", True)):
                return (taint, taint)  # the values in an unspecified order, which may follow the input's
            return taint if name == "argsort" else (None, taint)
        return x if name == "argsort" else (x, x)

    def scan(self, node: fx.Node, name: str):
        x = self.permuted(self.value(node.args[0]))
        if x is None:
            return None
        dim = self.dims(node, _SCANS[name], "dim", None, len(self.shape(node.args[0])))[0]
        if dim == x.dim:
            raise self.refuse(node, "accumulates along the permuted feature axis (its result depends on their order)")
        return (x, x) if name in ("cummax", "cummin") else x

    def along(self, node: fx.Node, x, name: str):
        """Operations along one axis that depend on the order of its entries (flip, roll, index_select…)."""
        xf = self.permuted(x)
        if xf is None:
            return None
        if name in ("gather", "take_along_dim", "repeat_interleave"):
            raise self.refuse(node, f"({name}) reorders entries of a tensor with permuted features")
        index, kw = {"flip": (1, "dims"), "roll": (2, "dims"), "index_select": (1, "dim")}[name]
        dims = self.dims(node, index, kw, None, len(self.shape(node.args[0])))
        if dims is None or xf.dim in dims:
            raise self.refuse(node, f"({name}) reorders the permuted feature axis")
        return xf

    # ---- shapes

    def reshape(self, node: fx.Node, x):
        """Any reshape (view, flatten, squeeze…): the features must stay on one output axis. Units of ``block``
        entries followed by ``inner`` entries of merged axes become blocks of ``block × inner``; features
        merged under ``outer`` entries of earlier axes repeat their layout ``outer`` times."""
        xf = self.permuted(x)
        if isinstance(x, _Attr):
            return self.attr_reshape(node, x)
        if xf is None:
            return None
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        inner = math.prod(in_shape[xf.dim + 1:])
        span = in_shape[xf.dim] * inner  # entries of one outer index
        leaves = self.groups.leaves(xf.segs)
        for j in reversed(range(len(out_shape))):  # (only one axis fits, unless there is one unit)
            q, stride = out_shape[j], math.prod(out_shape[j + 1:])
            if q == 1 or (q * stride) % span or span % stride:
                continue
            pos, segs, ok = 0, [], True
            for g, units, block in leaves:
                n = units * block * inner
                if g == _Groups.FIXED:
                    segs.append((g, n // stride, 1))
                elif (block * inner) % stride or (pos * inner) % stride:
                    ok = False
                    break
                else:
                    segs.append((g, units, block * inner // stride))
                pos += units * block
            repeat = q * stride // span
            if ok and len(segs) * repeat <= _MAX_SEGMENTS:
                return _Feat(j, segs * repeat)
        raise self.refuse(node, f"reshapes permuted features {in_shape} -> {out_shape} (axis {xf.dim}) so that they "
                          "no longer lie on one axis")

    def attr_reshape(self, node: fx.Node, x: _Attr):
        """A parameter reshaped only by adding or removing size-1 axes is still read directly."""
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        kept_in = [(a, n) for a, n in zip(x.axes, in_shape) if n != 1]
        if [n for _, n in kept_in] != [n for n in out_shape if n != 1]:
            return None
        it = iter(a for a, _ in kept_in)
        self.used.add(x.key)  # used through this value, which carries it on
        return _Attr(x.key, tuple(next(it) if n != 1 else None for n in out_shape))

    def expand(self, node: fx.Node, x):
        xf = self.permuted(x)
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        offset = len(out_shape) - len(in_shape)
        if isinstance(x, _Attr):  # still read directly: the expanded axes are size-1 axes of the entry
            self.used.add(x.key)
            return _Attr(x.key, (None,) * offset + tuple(
                a if n == out_shape[i + offset] else None for i, (a, n) in enumerate(zip(x.axes, in_shape))))
        if xf is None:
            return None
        return _Feat(xf.dim + offset, xf.segs)

    def repeat(self, node: fx.Node, x):
        xf = self.permuted(x)
        if xf is None:
            return None
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        dim = xf.dim + len(out_shape) - len(in_shape)
        times = out_shape[dim] // in_shape[xf.dim]
        if len(xf.segs) * times > _MAX_SEGMENTS:
            raise self.refuse(node, f"repeats the permuted features {times} times")
        return _Feat(dim, list(xf.segs) * times)

    def move(self, node: fx.Node, x, name: str):
        """permute/transpose/movedim…: where the feature axis goes, found by running the operation with the
        same arguments on a meta tensor whose axes all have different sizes."""
        xf = self.permuted(x)
        if isinstance(x, _Attr):
            return None
        if xf is None:
            return None
        ndim = len(self.shape(node.args[0]))
        probe = torch.empty(tuple(range(2, ndim + 2)), device="meta")
        args = self.concrete(node.args[1:])
        kwargs = self.concrete(dict(node.kwargs))
        if name == "getattr":
            moved = getattr(probe, node.args[1])
        else:
            moved = getattr(probe, name)(*args, **kwargs)
        return _Feat(list(moved.shape).index(xf.dim + 2), xf.segs)

    def index(self, node: fx.Node, x):
        """Basic indexing (``x[:, 2:5]``, ``x[..., None]``, ``x[:, 0]``): a slice of the feature axis is a slice of
        its layout; an integer or a tensor index into it is refused."""
        xf = self.permuted(x)
        idx = self.concrete(node.args[1])
        idx = idx if isinstance(idx, tuple) else (idx,)
        if isinstance(x, _Attr) and all(i is None or i is Ellipsis or i == slice(None) for i in idx):
            return self.attr_reshape(node, x)  # only size-1 axes added
        if xf is None:
            return None
        in_shape = self.shape(node.args[0])
        consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
        in_dim = out_dim = 0
        new_dim = None
        segs = xf.segs
        for item in idx:
            if item is None:
                out_dim += 1
            elif item is Ellipsis:
                skip = len(in_shape) - consuming
                if in_dim <= xf.dim < in_dim + skip:
                    new_dim = out_dim + xf.dim - in_dim
                in_dim += skip
                out_dim += skip
            elif isinstance(item, slice):
                if in_dim == xf.dim:
                    start, stop, step = item.indices(in_shape[in_dim])
                    if step != 1:
                        raise self.refuse(node, "slices the permuted feature axis with a step")
                    segs = self.groups.sub(xf.segs, start, stop) if (start, stop) != (
                        0, in_shape[in_dim]) else xf.segs
                    new_dim = out_dim
                in_dim += 1
                out_dim += 1
            elif isinstance(item, int):
                if in_dim == xf.dim:
                    raise self.refuse(node, "selects single entries of the permuted feature axis")
                in_dim += 1
            else:
                raise self.refuse(node, "indexes a tensor with permuted features by a tensor or a list")
        if new_dim is None:  # the feature axis is among the trailing axes the index left alone
            new_dim = out_dim + xf.dim - in_dim
        if not self.groups.permuted(segs):
            return None
        return _Feat(new_dim, segs)

    def narrow(self, node: fx.Node, x, name: str):
        xf = self.permuted(x)
        if xf is None:
            return None
        in_shape = self.shape(node.args[0])
        dim = int(self.concrete(_arg(node, 1, "dim"))) % len(in_shape)
        if name == "select":
            if dim == xf.dim:
                raise self.refuse(node, "selects single entries of the permuted feature axis")
            return _Feat(xf.dim - (dim < xf.dim), xf.segs)
        if dim != xf.dim:
            return xf
        start = int(self.concrete(_arg(node, 2, "start"))) % in_shape[dim]
        length = int(self.concrete(_arg(node, 3, "length")))
        return _Feat(dim, self.groups.sub(xf.segs, start, start + length))

    def split(self, node: fx.Node, x, name: str):
        """chunk/split/tensor_split/unbind: along the feature axis each piece is a slice of the layout (the
        groups cut at the pieces' boundaries); along another axis each piece keeps the layout."""
        xf = self.permuted(x)
        out = self.meta.get(node)
        count = len(out.items)
        if xf is None:
            return tuple([None] * count)
        in_shape = self.shape(node.args[0])
        dim = int(self.concrete(_arg(node, _SPLITS[name], "dim", 0))) % len(in_shape)
        if name == "unbind":
            if dim == xf.dim:
                raise self.refuse(node, "unbinds the permuted feature axis into separate tensors")
            return tuple(_Feat(xf.dim - (dim < xf.dim), xf.segs) for _ in range(count))
        if dim != xf.dim:
            return tuple(_Feat(xf.dim, xf.segs) for _ in range(count))
        sizes = [item.shape[dim] for item in out.items]
        bounds = [sum(sizes[:i]) for i in range(count + 1)]
        self.groups.cut(xf.segs, bounds)
        pieces = []
        for lo, hi in zip(bounds, bounds[1:]):
            segs = self.groups.sub(xf.segs, lo, hi)
            pieces.append(_Feat(dim, segs) if self.groups.permuted(segs) else None)
        return tuple(pieces)

    def operands(self, node: fx.Node) -> list[tuple[Any, tuple[int, ...]]]:
        """The (value, shape) of each tensor in cat's or stack's first argument (a list, or a tuple value)."""
        arg = _arg(node, 0, "tensors")
        if isinstance(arg, fx.Node):
            values, metas = self.value(arg), self.meta.get(arg)
            values = values if isinstance(values, (tuple, list)) else [None] * len(metas.items)
            return [(v, m.shape) for v, m in zip(values, metas.items)]
        return [(self.value(a), self.shape(a)) for a in arg]

    def cat(self, node: fx.Node):
        """Along the feature axis: the operands' layouts side by side (a fixed operand is a fixed run); along
        another axis: the operands' layouts are made one, as for element-wise operations."""
        ops = self.operands(node)
        ndim = len(self.shape(node))
        dim = int(self.concrete(_arg(node, 1, "dim", 0))) % ndim
        feats = [self.permuted(v) for v, _ in ops]
        on_axis = [f is not None and f.dim == dim for f in feats]
        if any(on_axis):
            if any(f is not None and f.dim != dim for f in feats):
                raise self.refuse(node, "concatenates tensors whose features lie on different axes")
            segs = []
            for (_, shape), f in zip(ops, feats):
                if f is not None:
                    segs.extend(f.segs)
                else:
                    segs.append((0, shape[dim], 1))
            return _Feat(dim, segs)
        return self.joined(node, ops, lambda f: f.dim)

    def stack(self, node: fx.Node):
        ops = self.operands(node)
        dim = int(self.concrete(_arg(node, 1, "dim", 0))) % len(self.shape(node))
        return self.joined(node, ops, lambda f: f.dim + (dim <= f.dim))

    def joined(self, node: fx.Node, ops, out_dim):
        """cat/stack along an axis other than the features: every operand's features must lie on one axis and
        their layouts are made one; a fixed operand fixes them."""
        feats = [self.permuted(v) for v, _ in ops]
        present = [f for f in feats if f is not None]
        if not present:
            return None
        if len({f.dim for f in present}) > 1:
            raise self.refuse(node, "joins tensors whose features lie on different axes")
        where = self.where(node)
        segs = present[0].segs
        for f in present[1:]:
            self.groups.unify(segs, f.segs, where)
        for (v, shape), f in zip(ops, feats):
            if f is None and shape[present[0].dim] > 1:
                if isinstance(v, _Attr):
                    self.claim_axes(v.key, {v.axes[present[0].dim]: segs}, where)
                    self.used.add(v.key)
                else:
                    self.groups.fix(segs)
        return _Feat(out_dim(present[0]), segs)

    def pad(self, node: fx.Node, x):
        xf = self.permuted(x)
        if xf is None:
            return None
        pads = list(self.concrete(_arg(node, 1, "pad")))
        mode = self.concrete(_arg(node, 2, "mode", "constant"))
        ndim = len(self.shape(node.args[0]))
        padded = {ndim - 1 - i // 2 for i in range(len(pads)) if pads[i]}
        if xf.dim not in padded:
            return xf
        before, after = pads[2 * (ndim - 1 - xf.dim)], pads[2 * (ndim - 1 - xf.dim) + 1]
        if mode != "constant" or before < 0 or after < 0:
            raise self.refuse(node, f"pads the permuted feature axis ({mode}, {before}, {after})")
        return _Feat(xf.dim, [(0, before, 1)] * bool(before) + list(xf.segs) + [(0, after, 1)] * bool(after))

    def spatial(self, node: fx.Node, x, k: int | None):
        """Pooling and resampling act on the last ``k`` axes (all axes after the channels for resampling)."""
        xf = self.permuted(x)
        if xf is None:
            out = self.meta.get(node)
            return (None, None) if isinstance(out, _Seq) else None
        ndim = len(self.shape(node.args[0]))
        first = 2 if k is None else ndim - k
        if xf.dim >= first:
            raise self.refuse(node, f"pools or resamples over axes {first}.. which include the permuted features "
                              f"(axis {xf.dim})")
        out = self.meta.get(node)
        return (xf, xf) if isinstance(out, _Seq) else xf


_COMPUTED = object()  # a layer's parameter given as a computed tensor rather than a model entry


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Derive the :class:`PermutationSpec` of ``model`` by tracing it on ``example_input``.

    ``example_input`` is a batch (any batch size ≥ 1) of the model's input; it is only used to learn
    tensor shapes (the model is run once per traced mode, in evaluation mode, without gradients). Raises
    :class:`UnsupportedOperationError` naming the node and operation for anything the derivation cannot prove
    to be permutation-equivariant.
    """
    graphs = {}
    for training in (False, True):
        try:
            graphs[training] = trace(model, training)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            mode = "training" if training else "evaluation"
            raise UnsupportedOperationError(f"cannot trace {type(model).__name__} with torch.fx in {mode} mode "
                                            f"({type(exc).__name__}: {exc})") from exc
    derivation = _Derivation(model)
    derivation.run(graphs[False], example_input, record_points=True)
    if graphs[True].code != graphs[False].code:
        derivation.run(graphs[True], example_input, record_points=False)
    return _build_spec(model, derivation)


def _axis_runs(groups: _Groups, segs: list[Seg] | None, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, leaf root or 0, block) runs of one axis of a box."""
    if segs is None:
        return [(lo, hi, 0, 1)]
    runs, pos = [], lo
    for g, units, block in groups.leaves(segs):
        end = pos + units * block
        if g == _Groups.FIXED and runs and runs[-1][2] == _Groups.FIXED:
            runs[-1] = (runs[-1][0], end, 0, 1)
        else:
            runs.append((pos, end, g, block))
        pos = end
    return runs


def _build_spec(model: nn.Module, derivation: _Derivation) -> PermutationSpec:
    groups = derivation.groups
    names: dict[int, str] = {}
    taken: set[str] = set()

    def name_of(root: int) -> str:
        if root not in names:
            name = groups.name(root)
            while name in taken:
                name += "'"
            names[root] = name
            taken.add(name)
        return names[root]

    perm_to_axes: dict[str, list[AxisRef]] = {}
    sizes: dict[str, int] = {}
    axes_to_perm: dict[str, tuple[str | None, ...]] = {}
    pieces: dict[str, Piece] = {}
    for key, shape in derivation.shapes.items():
        boxes = derivation.claims.get(derivation.alias[key])
        if boxes is None:
            axes_to_perm[key] = (None,) * len(shape)
            continue
        found = []  # (ranges, per-axis (root or 0, block))
        for box in boxes:
            runs = [_axis_runs(groups, segs, *box.ranges[axis]) for axis, segs in enumerate(box.axes)]
            combos = [[]]
            for axis_runs in runs:
                combos = [c + [r] for c in combos for r in axis_runs]
            found.extend((tuple((r[0], r[1]) for r in combo), tuple((r[2], r[3]) for r in combo)) for combo in combos)
        whole = len(found) == 1 and found[0][0] == tuple((0, n) for n in shape)
        if not any(g for _, axes in found for g, _ in axes):
            axes_to_perm[key] = (None,) * len(shape)
            continue
        for ranges, axes in found:
            if not any(g for g, _ in axes):
                continue
            entry = key if whole else f"{key}[{','.join(':' if (a, b) == (0, n) else f'{a}:{b}' for (a, b), n in zip(ranges, shape))}]"  # noqa: E501
            if not whole:
                pieces[entry] = Piece(key, ranges)
            per_axis = []
            for axis, (g, block) in enumerate(axes):
                if not g:
                    per_axis.append(None)
                    continue
                group = name_of(g)
                sizes[group] = groups.size[g]
                perm_to_axes.setdefault(group, []).append(AxisRef(entry, axis, block))
                per_axis.append(group)
            axes_to_perm[entry] = tuple(per_axis)
    points: dict[str, list[Point]] = {}
    for (node, dim), segs in derivation.points.items():
        pos = 0
        for g, units, block in groups.leaves(segs):
            if g and g in names:
                point = Point(node, dim, block, pos)
                if point not in points.setdefault(names[g], []):
                    points[names[g]].append(point)
            pos += units * block
    layers = {name: keys for name, keys in derivation.layers.items() if keys}
    spec = PermutationSpec(perm_to_axes, sizes, axes_to_perm, layers, pieces=pieces)
    spec.points = {g: points[g] for g in perm_to_axes if g in points}
    return spec
