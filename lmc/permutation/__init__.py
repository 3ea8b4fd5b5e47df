"""Permutation symmetry: specs derived from models, applying permutations, alignment methods."""

from lmc.permutation.apply import (
    Permutation,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from lmc.permutation.spec import AxisRef, PermutationSpec, UnsupportedOperationError, permutation_spec
from lmc.permutation.weight_matching import matching_objective, weight_matching

__all__ = [
    "AxisRef",
    "Permutation",
    "PermutationSpec",
    "UnsupportedOperationError",
    "apply_permutation",
    "identity_permutation",
    "invert_permutation",
    "matching_objective",
    "permutation_spec",
    "random_permutation",
    "weight_matching",
]
