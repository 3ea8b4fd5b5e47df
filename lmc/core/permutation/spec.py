"""Permutation specs: which parameter/buffer axes each permutation group acts on.

A :class:`PermutationSpec` is Git Re-Basin's perm→axes map. Here it is *derived* from the model by
tracing it with ``torch.fx`` and propagating, through the graph, which permutation group acts on the
feature (channel) axis of every intermediate tensor:

* a Linear/Conv layer starts a new group on its output features; its weight's input axis (and a
  following layer's input axis) is acted on by the group of its input;
* normalisation layers (BatchNorm, LayerNorm over the feature axis, GroupNorm with 1 or C groups),
  element-wise activations, dropout and pooling keep the group, and their per-channel parameters and
  running statistics follow it;
* ``a + b`` (residual connections) merges the groups of both operands into one shared group;
* ``flatten`` of a (N, C, *spatial) tensor keeps the group, acting on blocks of ``prod(spatial)``
  consecutive input features of the next Linear layer;
* the model's input and output features are fixed (never permuted).

Anything the derivation does not understand raises :class:`UnsupportedOperationError` naming the
node and operation; it never returns a silently wrong spec.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["AxisRef", "PermutationSpec", "UnsupportedOperationError", "permutation_spec"]


class UnsupportedOperationError(ValueError):
    """The model contains an operation the permutation-spec derivation cannot handle."""


@dataclass(frozen=True)
class AxisRef:
    """One axis of one state-dict entry acted on by a permutation group.

    ``block`` > 1 means the axis has ``size * block`` entries laid out as ``size`` consecutive blocks
    of ``block`` entries (a Linear layer's inputs after flattening a (C, H, W) feature map).
    """

    key: str
    axis: int
    block: int = 1


@dataclass
class PermutationSpec:
    """Permutation groups of a model.

    ``perm_to_axes[group]`` lists the state-dict axes a group acts on, ``sizes[group]`` its size, and
    ``axes_to_perm[key]`` gives, for every state-dict entry, the group acting on each of its axes
    (``None`` where the axis is not permuted).
    """

    perm_to_axes: dict[str, list[AxisRef]]
    sizes: dict[str, int]
    axes_to_perm: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    # layer (module) name -> its state-dict keys, in model order; used for layer-wise analyses
    layers: dict[str, list[str]] = field(default_factory=dict)
    # group -> activation points: (fx node name, feature axis, block) of every traced tensor with that
    # group's features that a Linear/Conv layer reads (used by activation matching)
    points: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    # what algorithms derive from the spec alone and keep for the next call (weight matching's stack layouts,
    # keyed by the entries' shapes); not part of the spec's identity
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._blocks: dict[tuple[str, int], int] = {}
        for refs in self.perm_to_axes.values():
            for ref in refs:
                self._blocks[(ref.key, ref.axis)] = ref.block

    def block(self, key: str, axis: int) -> int:
        return self._blocks.get((key, axis), 1)

    @property
    def groups(self) -> list[str]:
        return list(self.perm_to_axes)

    def __repr__(self) -> str:
        lines = [f"PermutationSpec({len(self.perm_to_axes)} groups)"]
        for g, refs in self.perm_to_axes.items():
            axes = ", ".join(f"{r.key}[{r.axis}]" + (f"x{r.block}" if r.block > 1 else "") for r in refs)
            lines.append(f"  {g} (n={self.sizes[g]}): {axes}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# derivation

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.tanh, torch.sigmoid, torch.nn.functional.leaky_relu,
    torch.nn.functional.elu, torch.nn.functional.dropout, torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool1d, torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.mish, torch.nn.functional.hardswish, torch.nn.functional.softplus,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "detach"}
_ADD = {operator.add, operator.iadd, torch.add}
_SCALE = {operator.mul, operator.imul, operator.truediv, torch.mul}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEAN_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_MEAN_METHODS = {"mean", "sum", "amax"}


class _Groups:
    """Union-find over permutation groups, with one distinguished FIXED element."""

    FIXED = 0

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.size: list[int | None] = [None]
        self.origin: list[str] = ["<fixed>"]

    def new(self, size: int, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            raise UnsupportedOperationError(f"{where}: adds tensors with {sa} and {sb} features")
        # FIXED (0) always wins; otherwise keep the earliest group as the name-giver
        root, child = (ra, rb) if ra < rb else (rb, ra)
        self.parent[child] = root
        return root


@dataclass
class _Feat:
    """What is known of one traced tensor: its feature axis and the group acting on it."""

    group: int  # group id (0 = fixed)
    dim: int  # feature axis (non-negative)
    block: int = 1  # features are blocks of this many entries (after flatten)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Derive the :class:`PermutationSpec` of ``model`` by tracing it on ``example_input``.

    ``example_input`` is a batch (any batch size ≥ 1) of the model's input; it is only used to learn
    tensor shapes. Raises :class:`UnsupportedOperationError` naming the node and operation for
    anything the derivation cannot prove to be permutation-equivariant.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise UnsupportedOperationError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc})"
        ) from exc
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    model.train(was_training)

    groups = _Groups()
    feats: dict[fx.Node, _Feat | None] = {}
    # state-dict key -> per-axis group ids (resolved at the end)
    key_axes: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # key -> [(axis, gid, block)]
    layers: dict[str, list[str]] = {}
    points: dict[str, tuple[int, int, int]] = {}  # node name -> (group id, feature axis, block)
    modules = dict(gm.named_modules())

    def feat(arg) -> _Feat | None:
        return feats.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_inputs(node: fx.Node) -> list[_Feat]:
        out = []
        for a in node.all_input_nodes:
            f = feats.get(a)
            if f is not None:
                out.append(f)
        return out

    def permuted(f: _Feat | None) -> bool:
        return f is not None and groups.find(f.group) != _Groups.FIXED

    def describe(node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(modules[node.target]).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({node.op} {target})"

    def unsupported(node: fx.Node, why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"cannot derive a permutation spec for {type(model).__name__}: {describe(node)} {why}"
        )

    def register(module_name: str, entries: dict[str, list[tuple[int, int, int]]]) -> None:
        mod = modules[module_name]
        names = [n for n, _ in mod.named_parameters(recurse=False)] + [
            n for n, b in mod.named_buffers(recurse=False) if b is not None
        ]
        keys = []
        for n in names:
            key = f"{module_name}.{n}" if module_name else n
            keys.append(key)
            if key in key_axes:
                raise unsupported_module(module_name, "is called more than once (shared weights)")
            key_axes[key] = entries.get(n, [])
        layers[module_name] = keys

    def unsupported_module(name: str, why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"cannot derive a permutation spec for {type(model).__name__}: module '{name}' "
            f"({type(modules[name]).__name__}) {why}"
        )

    def input_feature(node: fx.Node, x: _Feat | None, dim: int, size: int) -> int:
        """Group acting on the feature axis ``dim`` of this layer's input (0 if fixed)."""
        if x is None:
            return _Groups.FIXED
        shape = _shape(node.args[0])
        ndim = len(shape) if shape is not None else None
        if ndim is not None and x.dim != dim % ndim and permuted(x):
            raise unsupported(node, f"reads features on axis {dim % ndim}, but they are on axis {x.dim}")
        return x.group

    for node in gm.graph.nodes:
        shape = _shape(node)
        ndim = len(shape) if shape is not None else 0
        if node.op == "placeholder":
            feats[node] = _Feat(_Groups.FIXED, 1 if ndim > 1 else 0)
        elif node.op == "get_attr":
            feats[node] = None  # a raw parameter or constant; only allowed in fixed computations
            attr_users = [u for u in node.users]
            for u in attr_users:
                if any(permuted(feats.get(a)) for a in u.all_input_nodes if a is not node):
                    raise unsupported(u, f"uses parameter '{node.target}' directly on permuted features")
        elif node.op == "output":
            for a in node.all_input_nodes:
                f = feats.get(a)
                if f is not None:
                    groups.union(f.group, _Groups.FIXED, describe(node))
        elif node.op == "call_module":
            mod = modules[node.target]
            x = feat(node.args[0]) if node.args else None
            name = node.target
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and permuted(x):
                points[node.args[0].name] = (x.group, x.dim, x.block)
            if isinstance(mod, nn.Linear):
                gin = input_feature(node, x, -1, mod.in_features)
                block = x.block if x is not None else 1
                gout = groups.new(mod.out_features, name)
                register(name, {"weight": [(0, gout, 1), (1, gin, block)], "bias": [(0, gout, 1)]})
                feats[node] = _Feat(gout, ndim - 1)
            elif isinstance(mod, nn.modules.conv._ConvNd):
                if isinstance(mod, nn.modules.conv._ConvTransposeMixin):
                    raise unsupported(node, "is a transposed convolution, which is not supported")
                gin = input_feature(node, x, 1, mod.in_channels)
                if mod.groups == 1:
                    gout = groups.new(mod.out_channels, name)
                    register(name, {"weight": [(0, gout, 1), (1, gin, 1)], "bias": [(0, gout, 1)]})
                elif mod.groups == mod.in_channels == mod.out_channels:  # depthwise
                    gout = gin
                    register(name, {"weight": [(0, gout, 1)], "bias": [(0, gout, 1)]})
                else:
                    raise unsupported(node, f"is a grouped convolution (groups={mod.groups})")
                feats[node] = _Feat(gout, 1)
            elif isinstance(mod, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
                g = input_feature(node, x, 1, mod.num_features)
                per_channel = [(0, g, 1)]
                register(name, {k: per_channel for k in ("weight", "bias", "running_mean", "running_var")})
                feats[node] = _Feat(g, 1)
            elif isinstance(mod, nn.LayerNorm):
                if len(mod.normalized_shape) != 1:
                    raise unsupported(node, "normalises over more than the feature axis")
                g = input_feature(node, x, -1, mod.normalized_shape[0])
                register(name, {"weight": [(0, g, 1)], "bias": [(0, g, 1)]})
                feats[node] = _Feat(g, ndim - 1)
            elif isinstance(mod, nn.GroupNorm):
                if mod.num_groups not in (1, mod.num_channels) and permuted(x):
                    raise unsupported(node, f"has {mod.num_groups} groups; only 1 or one per channel "
                                      "are permutation-equivariant")
                g = input_feature(node, x, 1, mod.num_channels)
                register(name, {"weight": [(0, g, 1)], "bias": [(0, g, 1)]})
                feats[node] = _Feat(g, 1)
            elif isinstance(mod, nn.Flatten):
                feats[node] = _flatten(node, x, mod.start_dim, mod.end_dim, unsupported)
            elif isinstance(mod, _PASS_MODULES):
                if any(True for _ in mod.parameters(recurse=False)):
                    raise unsupported(node, "has parameters the derivation does not know")
                feats[node] = x
            else:
                ins = tensor_inputs(node)
                if any(permuted(f) for f in ins) or any(True for _ in mod.parameters(recurse=False)):
                    raise unsupported(node, "is not a layer the derivation knows")
                feats[node] = _Feat(_Groups.FIXED, 1 if ndim > 1 else 0) if shape else None
        elif node.op in ("call_function", "call_method"):
            target = node.target
            ins = tensor_inputs(node)
            x = feat(node.args[0]) if node.args else None
            if node.op == "call_method" and target in ("size", "dim") or not shape:
                feats[node] = None  # not a tensor
            elif target in _ADD:
                tensor_args = [feat(a) for a in node.args[:2] if isinstance(a, fx.Node)]
                tensor_args = [f for f in tensor_args if f is not None]
                if len(tensor_args) == 2:
                    a, b = tensor_args
                    if a.dim != b.dim or a.block != b.block:
                        if permuted(a) or permuted(b):
                            raise unsupported(node, "adds tensors whose features lie on different axes")
                    g = groups.union(a.group, b.group, describe(node))
                    feats[node] = _Feat(g, a.dim, a.block)
                else:
                    feats[node] = tensor_args[0] if tensor_args else None
            elif target in _SCALE:
                tensor_args = [feat(a) for a in node.args[:2] if isinstance(a, fx.Node)]
                tensor_args = [f for f in tensor_args if f is not None]
                if len(tensor_args) == 2:
                    a, b = tensor_args
                    g = groups.union(a.group, b.group, describe(node))
                    feats[node] = _Feat(g, a.dim, a.block)
                else:
                    feats[node] = tensor_args[0] if tensor_args else None
            elif (node.op == "call_function" and target in _PASS_FUNCTIONS) or (
                node.op == "call_method" and target in _PASS_METHODS
            ):
                feats[node] = x
            elif (node.op == "call_function" and target in _FLATTEN_FUNCTIONS) or (
                node.op == "call_method" and target in _FLATTEN_METHODS
            ):
                feats[node] = _flatten_node(node, x, permuted, unsupported)
            elif (node.op == "call_function" and target in _MEAN_FUNCTIONS) or (
                node.op == "call_method" and target in _MEAN_METHODS
            ):
                feats[node] = _reduce(node, x, permuted, unsupported)
            elif node.op == "call_function" and target in (
                torch.nn.functional.softmax, torch.nn.functional.log_softmax
            ) or (node.op == "call_method" and target in ("softmax", "log_softmax")):
                if permuted(x):
                    groups.union(x.group, _Groups.FIXED, describe(node))
                feats[node] = x
            else:
                if any(permuted(f) for f in ins):
                    raise unsupported(node, "is an operation the derivation does not know")
                feats[node] = _Feat(_Groups.FIXED, 1 if ndim > 1 else 0)
        else:  # pragma: no cover - fx has no other ops
            raise unsupported(node, "has an unknown fx op")

    # every parameter/buffer the trace did not reach is left unpermuted
    for key, _ in list(model.named_parameters()) + list(model.named_buffers()):
        key_axes.setdefault(key, [])

    spec = _build_spec(model, key_axes, layers, groups)
    for node_name, (gid, dim, block) in points.items():
        group = f"P_{groups.origin[groups.find(gid)]}"
        if group in spec.sizes:
            spec.points.setdefault(group, []).append((node_name, dim, block))
    return spec


def _flatten(node, x: _Feat | None, start_dim: int, end_dim: int, unsupported) -> _Feat | None:
    in_shape = _shape(node.args[0])
    out_shape = _shape(node)
    if x is None or in_shape is None:
        return x
    start = start_dim % len(in_shape)
    end = end_dim % len(in_shape)
    if x.dim < start or x.dim > end:
        return _Feat(x.group, x.dim - (end - start) if x.dim > end else x.dim, x.block)
    if x.dim != start:
        raise unsupported(node, "flattens features into a non-leading position")
    inner = math.prod(in_shape[start + 1 : end + 1])
    return _Feat(x.group, len(out_shape) - 1 if out_shape else start, x.block * inner)


def _flatten_node(node, x, permuted, unsupported) -> _Feat | None:
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if not permuted(x):
        return _Feat(0, 1 if out_shape and len(out_shape) > 1 else 0) if out_shape else x
    if node.target in ("view", "reshape"):
        # only (N, C, *spatial) -> (N, C * prod(spatial)) and no-op reshapes are understood
        if out_shape == in_shape:
            return x
        if len(out_shape) == 2 and x.dim == 1 and out_shape[0] == in_shape[0]:
            return _Feat(x.group, 1, x.block * math.prod(in_shape[2:]))
        raise unsupported(node, f"reshapes permuted features {in_shape} -> {out_shape}")
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    return _flatten(node, x, start, end, unsupported)


def _reduce(node, x, permuted, unsupported) -> _Feat | None:
    if not permuted(x):
        out_shape = _shape(node)
        return _Feat(0, 1 if out_shape and len(out_shape) > 1 else 0)
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None:
        raise unsupported(node, "reduces over all axes, including the permuted features")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % len(in_shape) for d in dims)
    if x.dim in dims:
        raise unsupported(node, "reduces over the permuted feature axis")
    keepdim = len(out_shape) == len(in_shape)
    new_dim = x.dim if keepdim else x.dim - sum(d < x.dim for d in dims)
    return _Feat(x.group, new_dim, x.block)


def _build_spec(model, key_axes, layers, groups: _Groups) -> PermutationSpec:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    roots: dict[int, str] = {}
    perm_to_axes: dict[str, list[AxisRef]] = {}
    sizes: dict[str, int] = {}
    axes_to_perm: dict[str, tuple[str | None, ...]] = {}
    for key, shape in shapes.items():
        per_axis: list[str | None] = [None] * len(shape)
        for axis, gid, block in key_axes.get(key, []):
            if axis >= len(shape):
                continue
            root = groups.find(gid)
            if root == _Groups.FIXED:
                continue
            if root not in roots:
                roots[root] = f"P_{groups.origin[root]}"
                perm_to_axes[roots[root]] = []
                sizes[roots[root]] = groups.size[root]
            name = roots[root]
            if shape[axis] != sizes[name] * block:
                raise UnsupportedOperationError(
                    f"cannot derive a permutation spec for {type(model).__name__}: '{key}' axis {axis} "
                    f"has {shape[axis]} entries, expected {sizes[name]}×{block} for group {name}"
                )
            per_axis[axis] = name
            perm_to_axes[name].append(AxisRef(key, axis, block))
        axes_to_perm[key] = tuple(per_axis)
    layers = {name: keys for name, keys in layers.items() if keys}
    return PermutationSpec(perm_to_axes, sizes, axes_to_perm, layers)
