"""Symmetries a model declares itself, where tracing cannot see them.

Tracing (:func:`lmc.core.permutation.permutation_spec`) finds the permutations of hidden units that leave
a network's function unchanged. Some models have symmetries that are not permutations of units: a soft
tree ensemble's subtree flip negates a node's ``(w, b)`` and swaps its two subtrees, and an oblivious
tree's levels can be reordered (:mod:`lmc.core.permutation.trees`). Such a model declares its group by a
``symmetry()`` method returning an object of the :class:`DeclaredSymmetry` shape, and the pipeline
(:mod:`lmc.stages.alignment`) aligns, stores and applies that group's elements instead of a traced
spec's permutations. Whatever a declared alignment returns is checked to leave the aligned model's
function unchanged (:func:`relative_output_difference`), so a wrong declaration stops the run instead of
giving wrong barriers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["DECLARED_METHODS", "SAME_FUNCTION_TOLERANCE", "DeclaredSymmetry", "declares_symmetry",
           "function_change", "relative_output_difference"]

# the alignment methods a declared symmetry provides (align.method); the others need a traced spec
DECLARED_METHODS = ("weight_matching", "activation_matching", "none")
# largest relative output difference between B and B aligned that still counts as the same function
# (float32 sums taken in another order differ by ~1e-7)
SAME_FUNCTION_TOLERANCE = 1e-4


class DeclaredSymmetry(Protocol):
    """What a model's ``symmetry()`` returns. An *element* of the group is any object with ``to_dict()``
    (plain tensors, for the run store); ``from_dict`` reads it back."""

    @property
    def invariances(self) -> tuple[str, ...]:
        """The kinds of transformation the group has, e.g. ``("perm", "flip", "order")``."""

    @property
    def layers(self) -> Mapping[str, Sequence[str]]:
        """Layer name → the state-dict entries a layer-wise sweep interpolates together."""

    def identity(self) -> Any: ...

    def apply(self, element: Any, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new state dict with the same keys and shapes, computing the same function."""

    def align(self, method: str, model_a: nn.Module, model_b: nn.Module, x_train: torch.Tensor | None = None,
              invariances: Sequence[str] = ..., num_samples: int = ..., seed: int = 0) -> Any:
        """The element aligning B to A by ``method`` (one of :data:`DECLARED_METHODS`), using only the
        transformations in ``invariances``; activation matching on ``num_samples`` rows of ``x_train``
        drawn with ``seed``."""

    def from_dict(self, d: Mapping[str, torch.Tensor]) -> Any: ...


def declares_symmetry(model: nn.Module | type) -> bool:
    """Whether a model (or model class) declares its symmetry by a ``symmetry()`` method."""
    return callable(getattr(model, "symmetry", None))


@torch.no_grad()
def function_change(model: nn.Module, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                    x: torch.Tensor) -> float:
    """The largest :func:`relative_output_difference` of ``model`` with ``other`` against ``reference`` in
    evaluation mode (running statistics) and, where the model has BatchNorm, in training mode too (batch
    statistics; the running-statistics updates go to copies, the state dicts are left as they were). One
    forward pass per state dict and mode; the model's mode is restored."""
    was_training = model.training
    try:
        model.eval()
        worst = relative_output_difference(model, reference, other, x)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            copies = [{k: v.clone() for k, v in sd.items()} for sd in (reference, other)]
            worst = max(worst, relative_output_difference(model, *copies, x))
    finally:
        model.train(was_training)
    return worst


@torch.no_grad()
def relative_output_difference(model: nn.Module, reference: Mapping[str, torch.Tensor],
                               other: Mapping[str, torch.Tensor], x: torch.Tensor) -> float:
    """``‖f_other(x) − f_reference(x)‖ / ‖f_reference(x)‖``: ``model``'s architecture evaluated (in its
    current mode) with the two state dicts on the inputs ``x``; 0 for identical functions."""
    out_ref = functional_call(model, dict(reference), (x,)).double()
    out = functional_call(model, dict(other), (x,)).double()
    return float((out - out_ref).norm() / out_ref.norm().clamp_min(1e-30))
