"""Soft tree ensembles (Kanoh & Sugiyama, "Linear Mode Connectivity in Differentiable Tree Ensembles",
ICLR 2025): M differentiable trees of depth D, summed.

Each inner node ``n`` of tree ``m`` sends ``x`` left with probability ``σ(w_nᵀx + b_n)`` and right with
``1 − σ(w_nᵀx + b_n) = σ(−(w_nᵀx + b_n))``; a leaf is reached with the product of the probabilities
along its path, ``π_leaf(x)``; the tree outputs ``Σ_leaves π_leaf(x) μ_leaf`` (``μ_leaf`` a vector of
``num_classes`` logits) and the ensemble the sum over its trees. ``kind`` chooses the tree
(:class:`lmc.core.permutation.trees.TreeShape` has the exact layout):

* ``perfect`` — a perfect binary tree (non-oblivious: every node has its own ``(w, b)``);
* ``oblivious`` — one ``(w, b)`` per depth level, shared by the level's nodes;
* ``decision_list`` — a chain branching in one direction only: node ``d`` exits left to leaf ``d`` or
  goes on to node ``d + 1``; the last node's right child is a terminal leaf;
* ``modified_decision_list`` — the same chain whose terminal leaf is empty (outputs 0), which removes
  the last node's subtree-flip symmetry.

The forward pass is vectorised over all trees: one matmul gives every node's response, one gather
and product the leaf probabilities, one matmul the summed outputs. The model declares its symmetry
group (tree permutation, subtree flips, splitting order): :meth:`SoftTreeEnsemble.symmetry`.

A depth-1 ensemble is a 2-layer perceptron with sigmoid units (:func:`perceptron_of`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from lmc.core.models._common import check_choice, check_positive_int
from lmc.core.permutation.trees import TREE_KINDS, TreeShape, TreeSymmetry

__all__ = ["TREE_KINDS", "SoftTreeEnsemble", "build", "perceptron_of"]

# leaf values are drawn from N(0, LEAF_INIT_SCALE² / trees), so that the ensemble's initial outputs
# (a sum over trees) have the same scale whatever the number of trees
LEAF_INIT_SCALE = 1.0


class SoftTreeEnsemble(nn.Module):
    """``trees`` soft trees of ``depth`` and ``kind`` over flattened inputs of ``input_shape``.

    Parameters: ``split_weight`` ``(M, N, F)``, ``split_bias`` ``(M, N)``, ``leaf_value`` ``(M, L, C)``.
    Split weights and biases start uniform in ``±1/√F`` (as ``nn.Linear``), leaf values normal with
    standard deviation ``LEAF_INIT_SCALE/√M``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, trees: int = 256, depth: int = 2,
                 kind: Literal["perfect", "oblivious", "decision_list", "modified_decision_list"] = "perfect"):
        super().__init__()
        check_positive_int("model.trees", trees)
        check_positive_int("model.depth", depth)
        check_choice("model.kind", kind, TREE_KINDS)
        self.shape = TreeShape(kind, depth)
        self.in_features = math.prod(input_shape)
        self.trees, self.depth, self.kind, self.num_classes = trees, depth, kind, num_classes
        bound = 1 / math.sqrt(self.in_features)
        N, L = self.shape.num_nodes, self.shape.num_leaves
        self.split_weight = nn.Parameter(torch.empty(trees, N, self.in_features).uniform_(-bound, bound))
        self.split_bias = nn.Parameter(torch.empty(trees, N).uniform_(-bound, bound))
        self.leaf_value = nn.Parameter(torch.randn(trees, L, num_classes) * (LEAF_INIT_SCALE / math.sqrt(trees)))

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every node's response ``wᵀx + b`` ``(B, M, N)`` and every leaf's probability ``(B, M, L)``."""
        x = x.flatten(1)
        z = (x @ self.split_weight.flatten(0, 1).T).view(len(x), self.trees, -1) + self.split_bias
        return z, self.shape.leaf_probabilities(z)

    def tree_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each tree's output ``(B, M, C)``."""
        _, prob = self.routing(x)
        return torch.einsum("bml,mlc->bmc", prob, self.leaf_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, prob = self.routing(x)
        return prob.flatten(1) @ self.leaf_value.flatten(0, 1)

    def symmetry(self) -> TreeSymmetry:
        """The symmetry group this ensemble declares (acts on its ``state_dict``)."""
        return TreeSymmetry(self.shape, self.trees)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, trees={self.trees}, " \
               f"depth={self.depth}, kind={self.kind}"


def build(input_shape: tuple[int, ...], num_classes: int, trees: int = 256, depth: int = 2, kind: str = "perfect",
          **_) -> SoftTreeEnsemble:
    return SoftTreeEnsemble(input_shape, num_classes, trees=trees, depth=depth, kind=kind)


def perceptron_of(model: SoftTreeEnsemble) -> nn.Sequential:
    """The 2-layer perceptron that computes exactly what a depth-1 ensemble computes.

    A depth-1 tree has one node and leaves ``μ_0`` (left) and ``μ_1`` (right; absent, i.e. 0, in the
    modified decision list), so with ``z_m = w_mᵀx + b_m``::

        f(x) = Σ_m σ(z_m) μ_m0 + (1 − σ(z_m)) μ_m1 = Σ_m μ_m1 + Σ_m σ(z_m) (μ_m0 − μ_m1)

    — a hidden layer of M sigmoid units with weights ``w_m`` and biases ``b_m``, then a linear layer
    with weights ``(μ_m0 − μ_m1)ᵀ`` and bias ``Σ_m μ_m1``. Every kind of tree agrees at depth 1.
    """
    if model.depth != 1:
        raise ValueError(f"only a depth-1 ensemble is a 2-layer perceptron, got depth {model.depth}")
    dtype = model.split_weight.dtype
    hidden = nn.Linear(model.in_features, model.trees, dtype=dtype)
    head = nn.Linear(model.trees, model.num_classes, dtype=dtype)
    with torch.no_grad():
        hidden.weight.copy_(model.split_weight[:, 0])
        hidden.bias.copy_(model.split_bias[:, 0])
        left = model.leaf_value[:, 0]
        right = model.leaf_value[:, 1] if model.shape.num_leaves == 2 else torch.zeros_like(left)
        head.weight.copy_((left - right).T)
        head.bias.copy_(right.sum(0))
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), hidden=hidden, sigmoid=nn.Sigmoid(), head=head))
