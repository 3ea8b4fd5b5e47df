"""lmc: linear mode connectivity experiments.

The stages of ``python -m lmc.run`` as plain functions, usable without Hydra::

    spec = lmc.permutation_spec(model_a, example_batch)
    perm = lmc.weight_matching(spec, params_a, params_b)
    aligned_b = lmc.apply_permutation(spec, perm, model_b.state_dict())

Other alignment methods return the same kind of permutation: ``lmc.activation_matching(spec, model_a,
model_b, batches)``, ``lmc.ste(spec, model, sd_a, sd_b, batches)``, ``lmc.sinkhorn(spec, model, sd_a,
sd_b, batches)``; several models: ``lmc.align_to_reference``, ``lmc.merge_many``, ``lmc.pairwise_barriers``.
"""

from lmc.barriers import barrier, barriers_from_curves, frankle_barrier, layerwise_barriers, midpoint_barrier
from lmc.interpolation import layerwise_sweep, lerp_state, sweep
from lmc.permutation import (
    PermutationSpec,
    UnsupportedOperationError,
    activation_matching,
    align_to_reference,
    apply_permutation,
    invert_permutation,
    matching_objective,
    merge_many,
    pairwise_barriers,
    permutation_spec,
    random_permutation,
    sinkhorn,
    ste,
    weight_matching,
)

__version__ = "0.1.0"

__all__ = [
    "PermutationSpec",
    "UnsupportedOperationError",
    "activation_matching",
    "align_to_reference",
    "apply_permutation",
    "barrier",
    "barriers_from_curves",
    "frankle_barrier",
    "invert_permutation",
    "layerwise_barriers",
    "layerwise_sweep",
    "lerp_state",
    "matching_objective",
    "merge_many",
    "midpoint_barrier",
    "pairwise_barriers",
    "permutation_spec",
    "random_permutation",
    "sinkhorn",
    "ste",
    "sweep",
    "weight_matching",
]
