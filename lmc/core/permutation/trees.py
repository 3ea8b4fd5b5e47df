"""Symmetries of soft tree ensembles and alignment under them (Kanoh & Sugiyama, "Linear Mode
Connectivity in Differentiable Tree Ensembles", ICLR 2025).

A soft tree ensemble computes the same function after any of these changes to its parameters:

* **tree permutation** — reorder the M trees (the ensemble sums them);
* **subtree flip** — at an inner node, swap its two subtrees and negate its ``(w, b)``: the node sends
  ``x`` left with ``σ(wᵀx + b)``, and ``σ(−c) = 1 − σ(c)``. Perfect binary trees have it at every
  node, oblivious trees at every level (one ``(w, b)`` per level, so a level flips as a whole), the
  original decision list only at its terminal node (whose two children are both leaves), the
  modified decision list nowhere;
* **splitting order** — an oblivious tree's levels can be reordered, its leaves permuted accordingly.

These are not visible to tracing (a flip pairs a sign change with a swap of whole subtrees), so a
tree model declares them: ``model.symmetry()`` returns a :class:`TreeSymmetry`. A group element is a
:class:`TreeTransform`: a tree permutation plus, per tree, its flips and its level order. Applying it
(:meth:`TreeSymmetry.apply`) returns a state dict with the same keys and shapes, which computes the
same function, interpolates with :func:`lmc.lerp_state` and loads with ``load_state_dict``.

Alignment (the paper's §4): the similarity of tree ``i`` of A and tree ``j`` of B is the best, over
the tree's flip/order *patterns* (enumerated: ``2^(2^D−1)`` flip patterns for a perfect tree of depth
D, ``2^D · D!`` flip and order patterns for an oblivious one, 2 for a decision list, 1 for the
modified one), inner product of A's tree with B's transformed tree, each node's ``(w, b)`` weighted by
the square root of the number of leaves it affects (so a root and a leaf count in proportion to their
influence on the output); one linear assignment over the trees gives the permutation, and each
matched pair keeps its best pattern. Weight matching takes the inner product of parameters;
activation matching that of each node's response ``wᵀx + b`` and each leaf's contribution
``π_leaf(x)·μ_leaf`` (its share of the tree's output) on sampled training points: both change under
a pattern exactly as the parameters do (a flip negates a node's response and swaps leaves), so the
same enumeration serves both.

The enumeration is vectorised: a pattern's similarity of two trees is a fixed linear combination of
the inner products of their nodes (and leaves) over the pairs the pattern puts side by side, so the
inner products of all tree pairs over every row pair some pattern uses are one batched matmul, and
all tree pairs × all patterns one more matmul with a ``(pairs, P)`` pattern matrix (in chunks of rows).
For perfect trees the best flips need no enumeration: flips of disjoint subtrees are independent, so
the best pattern is found bottom-up, keeping or flipping each node given its children's best
(:func:`perfect_flip_similarity`; ``search="auto"``, the default, uses it), which reaches the same
maxima as the enumeration and scales to depths whose ``2^(2^D−1)`` patterns cannot be listed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from lmc.errors import ConfigError

__all__ = ["INVARIANCES", "TREE_KINDS", "TreeShape", "TreeSymmetry", "TreeTransform", "ablations", "pattern_matrix",
           "pattern_similarity", "perfect_flip_choices", "perfect_flip_similarity"]

TREE_KINDS = ("perfect", "oblivious", "decision_list", "modified_decision_list")
INVARIANCES = ("perm", "flip", "order")
# the state dict entries of a tree ensemble: (M, N, F) split weights, (M, N) split biases, (M, L, C) leaf values
KEYS = ("split_weight", "split_bias", "leaf_value")

# enumeration refuses more patterns per tree than this (a perfect tree of depth 5 has 2^31)
_MAX_PATTERNS = 1 << 16
# similarity entries (tree pairs × patterns, or tree pairs × Gram columns) computed at once
_CHUNK_ELEMENTS = 1 << 24
# training points activation matching samples by default (the paper's choice)
DEFAULT_SAMPLES = 512
# how the best pattern of each tree pair is found: "enumerate" scores every pattern; "recursive" (perfect
# trees with flips) takes the best flip at each node bottom-up; "auto" recurses where it can
SEARCHES = ("auto", "enumerate", "recursive")


class TreeShape:
    """The routing structure of one tree: which node each leaf's path visits, in which direction.

    Nodes are the rows of a tree's ``(N, F)`` split weights; leaves the rows of its ``(L, C)`` leaf
    values. Going *left* at a node has probability ``σ(wᵀx + b)``, going right ``σ(−(wᵀx + b))``.

    * ``perfect``: ``N = 2^D − 1`` nodes in heap order (node ``n``'s children are ``2n+1``, left, and
      ``2n+2``); ``L = 2^D`` leaves, leaf ``ℓ``'s path read from the bits of ``ℓ``, most significant
      first (0 = left).
    * ``oblivious``: ``N = D`` rows, one per level, shared by all nodes of the level; ``L = 2^D`` leaves
      numbered as for ``perfect``.
    * ``decision_list``: ``N = D`` nodes in a chain; leaf ``d < D`` is reached by going right at nodes
      ``0..d−1`` and left at node ``d``; the terminal leaf ``D`` by going right at every node (``L = D + 1``).
    * ``modified_decision_list``: the same chain without the terminal leaf (its output is 0; ``L = D``).
    """

    def __init__(self, kind: str, depth: int):
        if kind not in TREE_KINDS:
            raise ConfigError(f"unknown model.kind '{kind}'; valid: {', '.join(TREE_KINDS)}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"model.depth must be a positive integer, got {depth!r}")
        self.kind, self.depth = kind, depth
        D = depth
        if kind in ("perfect", "oblivious"):
            self.num_leaves = 1 << D
            self.num_nodes = (1 << D) - 1 if kind == "perfect" else D
            leaves = torch.arange(self.num_leaves)[:, None]
            levels = torch.arange(D)[None, :]
            right = (leaves >> (D - 1 - levels)) & 1  # (L, D): direction at each level
            if kind == "perfect":
                path = (1 << levels) - 1 + (leaves >> (D - levels))  # heap index of the level-d ancestor
                node_leaves = [1 << (D - int(math.log2(n + 1))) for n in range(self.num_nodes)]
            else:
                path = levels.expand(self.num_leaves, D)
                node_leaves = [self.num_leaves] * D  # a level's (w, b) acts on every leaf
            present = torch.ones(self.num_leaves, D, dtype=torch.bool)
        else:
            self.num_nodes = D
            self.num_leaves = D + 1 if kind == "decision_list" else D
            leaf = torch.arange(self.num_leaves)[:, None]
            step = torch.arange(D)[None, :]
            path = step.expand(self.num_leaves, D)
            present = step <= leaf  # the terminal leaf D visits all D nodes
            right = (step < leaf).long()
            node_leaves = [self.num_leaves - n for n in range(D)]  # node n leads to leaves n..L−1
        self.path_node = path.contiguous()  # (L, D) node visited at each step (any valid index where absent)
        self.path_sign = torch.where(present, 1.0 - 2.0 * right, 0.0)  # (L, D): +1 left, −1 right, 0 absent
        self.node_leaves = torch.tensor(node_leaves)  # (N,) leaves each node's (w, b) affects
        # (N, L) each: 1 where leaf ℓ's path goes left (right) at node n
        visits = torch.zeros(self.num_nodes, self.num_leaves, D)
        visits[self.path_node.T, torch.arange(self.num_leaves)[None, :], torch.arange(D)[:, None]] = self.path_sign.T
        self.incidence = ((visits > 0).sum(-1).double(), (visits < 0).sum(-1).double())
        flippable = {"perfect": [True] * self.num_nodes, "oblivious": [True] * D,
                     "decision_list": [False] * (D - 1) + [True], "modified_decision_list": [False] * D}[kind]
        self.flippable = torch.tensor(flippable)  # (N,)

    @property
    def invariances(self) -> tuple[str, ...]:
        """The invariances this kind of tree has besides the tree permutation."""
        out = ("perm",)
        if bool(self.flippable.any()):
            out += ("flip",)
        if self.kind == "oblivious" and self.depth > 1:
            out += ("order",)
        return out

    def leaf_probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """``(…, N)`` node responses ``wᵀx + b`` → ``(…, L)`` probabilities of reaching each leaf.

        The product along each path is taken in the log domain, as one matmul of the nodes' log
        probabilities of going left and right with the path incidence matrices: no gather of a
        ``(…, L, D)`` tensor (slow on the CPU), and ``log σ`` is exact where ``σ`` underflows."""
        left, right = self.incidence
        log_left = F.logsigmoid(z)
        log_right = log_left - z  # log σ(−z) = log σ(z) − z
        return torch.exp(log_left @ left.to(z.device, z.dtype) + log_right @ right.to(z.device, z.dtype))

    def tables(self, flips: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a tree's flips ``(…, N)`` (bool, indexed by the source tree's nodes) and level order
        ``(…, D)`` do to its rows: the transformed tree's node ``n`` is ``node_sign[n]`` times the source
        node ``node_src[n]``, its leaf ``ℓ`` the source leaf ``leaf_src[ℓ]``. Batched over ``…``."""
        D, N, L = self.depth, self.num_nodes, self.num_leaves
        lead = flips.shape[:-1]
        leaves = torch.arange(L)
        if self.kind == "perfect":
            src = torch.zeros(*lead, L, dtype=torch.long)  # source node each output leaf's path is at
            node_src = torch.zeros(*lead, N, dtype=torch.long)
            for d in range(D):
                node_src[..., (1 << d) - 1 + (leaves >> (D - d))] = src  # duplicates carry equal values
                went_right = (leaves >> (D - 1 - d)) & 1
                src = 2 * src + 1 + (went_right ^ flips.gather(-1, src).long())
            leaf_src = src - N
        elif self.kind == "oblivious":
            node_src = order.clone()
            bits = (leaves[:, None] >> (D - 1 - torch.arange(D))) & 1  # (L, D) output leaf's direction per level
            flipped = flips.gather(-1, order).long()[..., None, :]  # (…, 1, D) whether output level d is flipped
            leaf_src = ((bits ^ flipped) << (D - 1 - order)[..., None, :]).sum(-1)
        else:
            node_src = torch.arange(N).expand(*lead, N).clone()
            leaf_src = leaves.expand(*lead, L).clone()
            if self.kind == "decision_list":  # a terminal flip swaps the last node's two leaves
                swap = flips[..., D - 1]
                leaf_src[..., D - 1] = torch.where(swap, D, D - 1)
                leaf_src[..., D] = torch.where(swap, D - 1, D)
        node_sign = 1.0 - 2.0 * flips.gather(-1, node_src).double()
        return node_src, node_sign, leaf_src

    def patterns(self, invariances: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every flip/order pattern of one tree under ``invariances``: flips ``(P, N)`` and orders
        ``(P, D)``; pattern 0 is the identity. Invariances this kind lacks contribute nothing."""
        chosen = _check_invariances(invariances)
        N, D = self.num_nodes, self.depth
        free = self.flippable.nonzero().flatten().tolist() if "flip" in chosen else []
        orders = list(itertools.permutations(range(D))) if "order" in chosen and self.kind == "oblivious" else [
            tuple(range(D))]
        count = (1 << len(free)) * len(orders)
        if count > _MAX_PATTERNS:
            raise ConfigError(f"a {self.kind} tree of depth {D} has {count} flip/order patterns, more than the "
                              f"{_MAX_PATTERNS} the enumeration handles; use a smaller model.depth or fewer "
                              "invariances (perfect trees: search='auto' needs no enumeration)")
        flip_rows = []
        for bits in itertools.product((False, True), repeat=len(free)):
            row = [False] * N
            for node, bit in zip(free, bits):
                row[node] = bit
            flip_rows.append(row)
        flips = torch.tensor([f for _ in orders for f in flip_rows], dtype=torch.bool).reshape(count, N)
        order = torch.tensor([o for o in orders for _ in flip_rows], dtype=torch.long).reshape(count, D)
        return flips, order


def _check_invariances(invariances: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(invariances)
    bad = [v for v in chosen if v not in INVARIANCES]
    if bad or "perm" not in chosen:
        raise ConfigError(f"bad align.invariances {list(chosen)}; valid: 'perm' plus any of 'flip', 'order'")
    return chosen


@dataclass
class TreeTransform:
    """An element of a tree ensemble's symmetry group.

    ``perm`` ``(M,)``: the transformed ensemble's tree ``i`` comes from tree ``perm[i]`` (Git
    Re-Basin's convention); ``flips`` ``(M, N)`` bool: the subtree flips applied to that tree, indexed
    by its own nodes; ``order`` ``(M, D)``: its levels' new order (oblivious trees; the identity
    otherwise), level ``d`` of the result being the source's level ``order[i, d]``.
    """

    perm: torch.Tensor
    flips: torch.Tensor
    order: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (for ``torch.save`` and the run store)."""
        return {"perm": self.perm, "flips": self.flips, "order": self.order}

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor]) -> TreeTransform:
        return cls(d["perm"].long(), d["flips"].bool(), d["order"].long())


class TreeSymmetry:
    """The symmetry group of an ensemble of ``trees`` trees of one :class:`TreeShape`, acting on state
    dicts with the entries :data:`KEYS` (each under ``prefix``); other entries are left as they are.
    A declared symmetry (:class:`lmc.core.permutation.declared.DeclaredSymmetry`): the pipeline aligns,
    stores and applies its elements instead of a traced permutation spec's."""

    def __init__(self, shape: TreeShape, trees: int, prefix: str = ""):
        self.shape, self.trees, self.prefix = shape, trees, prefix

    @property
    def invariances(self) -> tuple[str, ...]:
        return self.shape.invariances

    @property
    def layers(self) -> dict[str, tuple[str, ...]]:
        """The entries interpolated together in layer-wise sweeps: the splits ``(w, b)`` and the leaves."""
        return {"splits": (self.prefix + KEYS[0], self.prefix + KEYS[1]), "leaves": (self.prefix + KEYS[2],)}

    def from_dict(self, d: Mapping[str, torch.Tensor]) -> TreeTransform:
        """The element :meth:`TreeTransform.to_dict` wrote."""
        return TreeTransform.from_dict(d)

    def identity(self) -> TreeTransform:
        M, N, D = self.trees, self.shape.num_nodes, self.shape.depth
        return TreeTransform(torch.arange(M), torch.zeros(M, N, dtype=torch.bool), torch.arange(D).repeat(M, 1))

    def random(self, generator: torch.Generator | int | None = None,
               invariances: Iterable[str] = INVARIANCES) -> TreeTransform:
        """A uniformly random element of the group generated by ``invariances`` (``generator`` may be a seed)."""
        chosen = _check_invariances(invariances)
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        M, N, D = self.trees, self.shape.num_nodes, self.shape.depth
        perm = torch.randperm(M, generator=generator)
        flips = torch.rand(M, N, generator=generator) < 0.5
        flips &= self.shape.flippable if "flip" in chosen else torch.zeros(N, dtype=torch.bool)
        if "order" in chosen and self.shape.kind == "oblivious":
            order = torch.argsort(torch.rand(M, D, generator=generator), dim=1)
        else:
            order = torch.arange(D).repeat(M, 1)
        return TreeTransform(perm, flips, order)

    def _entries(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = [self.prefix + k for k in KEYS]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"not a tree ensemble's state dict: missing {missing}")
        weight, bias, leaf = (state_dict[k] for k in keys)
        expect = (self.trees, self.shape.num_nodes)
        if tuple(weight.shape[:2]) != expect or tuple(bias.shape) != expect or tuple(leaf.shape[:2]) != (
                self.trees, self.shape.num_leaves):
            raise ValueError(f"state dict shapes {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(leaf.shape)} do "
                             f"not fit {self.trees} {self.shape.kind} trees of depth {self.shape.depth}")
        return weight, bias, leaf

    def apply(self, element: TreeTransform, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new state dict: ``state_dict``'s trees permuted, flipped and re-ordered by ``element``."""
        weight, bias, leaf = self._entries(state_dict)
        flips, order = element.flips.bool().cpu(), element.order.long().cpu()
        if bool((flips & ~self.shape.flippable).any()):
            raise ValueError(f"flips at nodes a {self.shape.kind} tree cannot flip")
        node_src, node_sign, leaf_src = self.shape.tables(flips, order)
        perm = element.perm.long().to(weight.device)
        node_src, leaf_src = node_src.to(weight.device), leaf_src.to(weight.device)
        sign = node_sign.to(weight.device, weight.dtype)
        weight = weight[perm].gather(1, node_src[..., None].expand(-1, -1, weight.shape[-1])) * sign[..., None]
        bias = bias[perm].gather(1, node_src) * sign
        leaf = leaf[perm].gather(1, leaf_src[..., None].expand(-1, -1, leaf.shape[-1]))
        out = dict(state_dict)
        out.update(zip([self.prefix + k for k in KEYS], (weight, bias, leaf)))
        return out

    def node_weights(self) -> torch.Tensor:
        """``(N,)`` the square root of the number of leaves each node affects (the paper's weighting)."""
        return self.shape.node_leaves.double().sqrt()

    def weight_matching(
        self,
        sd_a: Mapping[str, torch.Tensor],
        sd_b: Mapping[str, torch.Tensor],
        invariances: Iterable[str] = INVARIANCES,
        search: str = "auto",
    ) -> TreeTransform:
        """The element that aligns B's trees to A's by their weighted parameters; apply it to ``sd_b``.
        ``search``: how the best pattern of each tree pair is found (see :data:`SEARCHES`)."""
        weight_a, bias_a, leaf_a = self._entries(sd_a)
        weight_b, bias_b, leaf_b = self._entries(sd_b)
        nodes_a = torch.cat([weight_a.flatten(2), bias_a[..., None]], dim=-1)
        nodes_b = torch.cat([weight_b.flatten(2), bias_b[..., None]], dim=-1)
        return self._match(nodes_a, nodes_b.to(nodes_a), leaf_a.flatten(2), leaf_b.flatten(2).to(nodes_a), invariances,
                           search)

    @torch.no_grad()
    def activation_matching(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        x: torch.Tensor,
        invariances: Iterable[str] = INVARIANCES,
        search: str = "auto",
    ) -> TreeTransform:
        """The element that aligns B's trees to A's by their responses on ``x`` (a batch of training
        points, e.g. 512 sampled ones): each node's ``wᵀx + b`` and each leaf's ``π_leaf(x)·μ_leaf``."""
        feats = []
        for model in (model_a, model_b):
            z, prob = model.routing(x)  # (B, M, N), (B, M, L)
            leaf = getattr(model, KEYS[2])  # (M, L, C)
            contribution = prob.permute(1, 2, 0)[..., None] * leaf[:, :, None, :]  # (M, L, B, C)
            feats.append((z.permute(1, 2, 0), contribution.flatten(2)))
        (nodes_a, leaves_a), (nodes_b, leaves_b) = feats
        return self._match(nodes_a, nodes_b, leaves_a, leaves_b, invariances, search)

    def align(
        self,
        method: str,
        model_a: nn.Module,
        model_b: nn.Module,
        x_train: torch.Tensor | None = None,
        invariances: Iterable[str] = INVARIANCES,
        num_samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        search: str = "auto",
    ) -> TreeTransform:
        """``weight_matching``, ``activation_matching`` (on ``num_samples`` rows of ``x_train`` drawn with
        ``seed``) or ``none`` (the identity: the naive interpolation)."""
        if method == "none":
            return self.identity()
        if method == "weight_matching":
            return self.weight_matching(model_a.state_dict(), model_b.state_dict(), invariances, search)
        if method != "activation_matching":
            raise ConfigError(f"unknown align.method '{method}' for a tree ensemble; valid: weight_matching, "
                              "activation_matching, none")
        if x_train is None:
            raise ValueError("activation matching needs training data")
        if num_samples < 1:
            raise ConfigError(f"align.num_samples must be a positive integer, got {num_samples}")
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(x_train), generator=gen)[:num_samples].to(x_train.device)
        return self.activation_matching(model_a, model_b, x_train[rows], invariances, search)

    def _match(self, nodes_a: torch.Tensor, nodes_b: torch.Tensor, leaves_a: torch.Tensor, leaves_b: torch.Tensor,
               invariances: Iterable[str], search: str = "auto") -> TreeTransform:
        if search not in SEARCHES:
            raise ConfigError(f"unknown align.search '{search}'; valid: {', '.join(SEARCHES)}")
        chosen = _check_invariances(invariances)
        recursive = self.shape.kind == "perfect" and "flip" in chosen
        if search == "recursive" and not recursive:
            raise ConfigError(f"align.search=recursive needs perfect trees and the flip invariance, got "
                              f"{self.shape.kind} trees and {list(chosen)}")
        if recursive and search != "enumerate":
            omega2 = self.node_weights().to(nodes_a.device, nodes_a.dtype) ** 2
            best = perfect_flip_similarity(self.shape.depth, omega2, nodes_a, nodes_b, leaves_a, leaves_b)
            _, cols = linear_sum_assignment(best.cpu().numpy(), maximize=True)
            perm = torch.from_numpy(cols).long()
            flips = perfect_flip_choices(self.shape.depth, omega2, nodes_a, nodes_b[perm.to(nodes_b.device)],
                                         leaves_a, leaves_b[perm.to(leaves_b.device)])
            return TreeTransform(perm, flips.cpu(), torch.arange(self.shape.depth).repeat(self.trees, 1))
        flips, order = self.shape.patterns(chosen)
        best, arg = pattern_similarity(self.shape, self.node_weights(), flips, order,
                                       nodes_a, nodes_b, leaves_a, leaves_b)
        _, cols = linear_sum_assignment(best.cpu().numpy(), maximize=True)
        perm = torch.from_numpy(cols).long()
        chosen = arg[torch.arange(self.trees), perm].cpu()
        return TreeTransform(perm, flips[chosen], order[chosen])


def pattern_matrix(shape: TreeShape, node_weights: torch.Tensor, flips: torch.Tensor,
                   order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (node of A, node of B) and (leaf of A, leaf of B) pairs some pattern puts side by side —
    ``(U, 2)`` and ``(V, 2)`` — and the ``(U + V, P)`` matrix whose column ``p`` turns two trees' inner
    products over these pairs into their similarity under pattern ``p``. Pairs no pattern uses (nodes
    of different depths in a perfect tree) are never computed."""
    N, L, P = shape.num_nodes, shape.num_leaves, len(flips)
    node_src, node_sign, leaf_src = shape.tables(flips, order)
    node_pairs = torch.stack([torch.arange(N).expand(P, N), node_src], -1).reshape(-1, 2).unique(dim=0)
    leaf_pairs = torch.stack([torch.arange(L).expand(P, L), leaf_src], -1).reshape(-1, 2).unique(dim=0)
    node_row = torch.full((N, N), -1, dtype=torch.long)
    node_row[node_pairs[:, 0], node_pairs[:, 1]] = torch.arange(len(node_pairs))
    leaf_row = torch.full((L, L), -1, dtype=torch.long)
    leaf_row[leaf_pairs[:, 0], leaf_pairs[:, 1]] = torch.arange(len(leaf_pairs)) + len(node_pairs)
    columns = torch.arange(P)
    matrix = torch.zeros(len(node_pairs) + len(leaf_pairs), P, dtype=torch.float64)
    for n in range(N):
        matrix[node_row[n, node_src[:, n]], columns] += node_weights[n] ** 2 * node_sign[:, n]
    for leaf in range(L):
        matrix[leaf_row[leaf, leaf_src[:, leaf]], columns] += 1.0
    return node_pairs, leaf_pairs, matrix


def pattern_similarity(
    shape: TreeShape,
    node_weights: torch.Tensor,
    flips: torch.Tensor,
    order: torch.Tensor,
    nodes_a: torch.Tensor,
    nodes_b: torch.Tensor,
    leaves_a: torch.Tensor,
    leaves_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best similarity ``(M, M)`` of every tree of A with every tree of B over the patterns, and the
    pattern reaching it. ``nodes_*`` ``(M, N, K)`` and ``leaves_*`` ``(M, L, K')`` are the features
    (parameters or responses) a pattern moves as rows. One batched matmul gives the inner products of
    all tree pairs over every row pair some pattern uses, ``(U + V, c, M)``, one more matmul with the
    pattern matrix all pairs × patterns, in chunks of ``c`` rows of A."""
    M = nodes_a.shape[0]
    node_pairs, leaf_pairs, matrix = pattern_matrix(shape, node_weights, flips, order)
    matrix = matrix.to(nodes_a.device, nodes_a.dtype)
    node_pairs, leaf_pairs = node_pairs.to(nodes_a.device), leaf_pairs.to(nodes_a.device)
    # (U, K, M) and (V, K', M): B's rows of each pair, laid out for the batched matmul
    right_nodes = nodes_b[:, node_pairs[:, 1]].permute(1, 2, 0)
    right_leaves = leaves_b[:, leaf_pairs[:, 1]].permute(1, 2, 0)
    chunk = max(1, _CHUNK_ELEMENTS // (len(nodes_b) * max(len(matrix), len(flips))))
    best, arg = [], []
    for start in range(0, M, chunk):
        rows = slice(start, start + chunk)
        gram = torch.cat([nodes_a[rows, node_pairs[:, 0]].transpose(0, 1) @ right_nodes,  # (U, c, M)
                          leaves_a[rows, leaf_pairs[:, 0]].transpose(0, 1) @ right_leaves])  # (V, c, M)
        scores = torch.tensordot(gram, matrix, dims=([0], [0]))  # (c, M, P)
        value, index = scores.max(dim=2)
        best.append(value)
        arg.append(index)
    return torch.cat(best), torch.cat(arg)


def _flip_recursion(depth: int, omega2: torch.Tensor, nodes_a: torch.Tensor, nodes_b: torch.Tensor,
                    leaves_a: torch.Tensor, leaves_b: torch.Tensor, pairwise: bool):
    """The best flip pattern of perfect trees, bottom-up: the best similarity of A's subtree at level
    position ``k`` with B's subtree at ``k'`` is, at their roots, the better of keeping
    (``ω²·<A_k, B_k'>`` plus left with left and right with right) and flipping (``−ω²·<A_k, B_k'>`` plus
    left with right and right with left): flips of disjoint subtrees are independent, so this is the
    maximum over all ``2^(2^D−1)`` patterns. Values are ``(2^d, 2^d, …)`` tensors over (A position, B
    position); ``…`` is (A tree, B tree) with ``pairwise``, else tree ``i`` of A with tree ``i`` of B."""
    equation = "xik,yjk->xyij" if pairwise else "xik,yik->xyi"
    value = torch.einsum(equation, leaves_a.transpose(0, 1), leaves_b.transpose(0, 1))  # (L, L, …)
    choices = []
    for d in reversed(range(depth)):
        first, width = (1 << d) - 1, 1 << d
        level = slice(first, first + width)
        node = omega2[first] * torch.einsum(equation, nodes_a[:, level].transpose(0, 1),
                                            nodes_b[:, level].transpose(0, 1))  # (w, w, …)
        children = value.reshape(width, 2, width, 2, *value.shape[2:])
        keep = node + children[:, 0, :, 0] + children[:, 1, :, 1]
        flip = children[:, 0, :, 1] + children[:, 1, :, 0] - node
        choice = flip > keep
        value = torch.where(choice, flip, keep)
        choices.append(choice)
    return value[0, 0], choices[::-1]


def perfect_flip_similarity(depth: int, omega2: torch.Tensor, nodes_a: torch.Tensor, nodes_b: torch.Tensor,
                            leaves_a: torch.Tensor, leaves_b: torch.Tensor) -> torch.Tensor:
    """``(M, M)``: the best similarity of every tree pair over all flip patterns of a perfect tree
    (:func:`_flip_recursion`, in chunks of rows of A); equal to :func:`pattern_similarity`'s."""
    M, L = len(nodes_a), leaves_a.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (L * L * len(nodes_b)))
    return torch.cat([_flip_recursion(depth, omega2, nodes_a[rows], nodes_b, leaves_a[rows], leaves_b, True)[0]
                      for rows in (slice(s, s + chunk) for s in range(0, M, chunk))])


def perfect_flip_choices(depth: int, omega2: torch.Tensor, nodes_a: torch.Tensor, nodes_b: torch.Tensor,
                         leaves_a: torch.Tensor, leaves_b: torch.Tensor) -> torch.Tensor:
    """``(M, N)`` bool: the best flips of B's tree ``i`` (indexed by its own nodes) against A's tree
    ``i``, read back top-down from the recursion's choices."""
    _, choices = _flip_recursion(depth, omega2, nodes_a, nodes_b, leaves_a, leaves_b, False)
    M = len(nodes_a)
    trees = torch.arange(M, device=nodes_a.device)
    flips = torch.zeros(M, (1 << depth) - 1, dtype=torch.bool, device=nodes_a.device)
    matched = torch.zeros(1, M, dtype=torch.long, device=nodes_a.device)  # B's position under A's position k
    for d, choice in enumerate(choices):
        positions = torch.arange(1 << d, device=nodes_a.device)[:, None]
        flip = choice[positions, matched, trees]  # (2^d, M)
        flips[trees, (1 << d) - 1 + matched] = flip
        matched = torch.stack([2 * matched + flip.long(), 2 * matched + 1 - flip.long()], 1).flatten(0, 1)
    return flips


def ablations(symmetry: TreeSymmetry) -> dict[str, Sequence[str]]:
    """The paper's ablation rows this kind of tree has: ``perm``, ``perm+flip``, ``perm+flip+order``
    (each only where it differs from the previous one)."""
    rows = {"perm": ("perm",)}
    if "flip" in symmetry.invariances:
        rows["perm+flip"] = ("perm", "flip")
    if "order" in symmetry.invariances:
        rows["perm+flip+order"] = ("perm", "flip", "order")
    return rows
