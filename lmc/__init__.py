"""lmc: linear mode connectivity experiments.

The stages of ``python -m lmc.run`` as plain functions, usable without Hydra::

    spec = lmc.permutation_spec(model_a, example_batch)
    perm = lmc.weight_matching(spec, params_a, params_b)
    aligned_b = lmc.apply_permutation(spec, perm, model_b.state_dict())
"""

from lmc.barriers import barrier, barriers_from_curves, frankle_barrier, layerwise_barriers, midpoint_barrier
from lmc.interpolation import layerwise_sweep, lerp_state, sweep
from lmc.permutation import (
    PermutationSpec,
    UnsupportedOperationError,
    apply_permutation,
    invert_permutation,
    matching_objective,
    permutation_spec,
    random_permutation,
    weight_matching,
)

__version__ = "0.1.0"

__all__ = [
    "PermutationSpec",
    "UnsupportedOperationError",
    "apply_permutation",
    "barrier",
    "barriers_from_curves",
    "frankle_barrier",
    "invert_permutation",
    "layerwise_barriers",
    "layerwise_sweep",
    "lerp_state",
    "matching_objective",
    "midpoint_barrier",
    "permutation_spec",
    "random_permutation",
    "sweep",
    "weight_matching",
]
