"""Permutation symmetry: specs derived from models, applying permutations, alignment methods."""

from lmc.core.permutation.activation_matching import activation_matching
from lmc.core.permutation.apply import (
    Permutation,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from lmc.core.permutation.declared import DeclaredSymmetry, declares_symmetry
from lmc.core.permutation.learned import sinkhorn_rebasin, ste
from lmc.core.permutation.merge import align_to_reference, merge_many
from lmc.core.permutation.soft import apply_soft_permutation, permutation_matrix, sinkhorn_normalize
from lmc.core.permutation.spec import AxisRef, PermutationSpec, UnsupportedOperationError, permutation_spec
from lmc.core.permutation.weight_matching import cost_matrices, matching_objective, weight_matching

sinkhorn = sinkhorn_rebasin

__all__ = [
    "AxisRef",
    "DeclaredSymmetry",
    "Permutation",
    "PermutationSpec",
    "UnsupportedOperationError",
    "activation_matching",
    "align_to_reference",
    "apply_permutation",
    "apply_soft_permutation",
    "cost_matrices",
    "declares_symmetry",
    "identity_permutation",
    "invert_permutation",
    "matching_objective",
    "merge_many",
    "permutation_matrix",
    "permutation_spec",
    "random_permutation",
    "sinkhorn",
    "sinkhorn_normalize",
    "sinkhorn_rebasin",
    "ste",
    "weight_matching",
]
