"""lmc: linear mode connectivity experiments.

The package is built in layers, each importing only the ones below it:

1. ``lmc.errors``, ``lmc.io``, ``lmc.settings`` — errors, atomic file I/O, typed settings from mappings;
2. ``lmc.core`` — tensors, modules and state dicts: data, models, training, permutation specs and
   alignment methods, interpolation, barriers, normalisation corrections (usable from a notebook);
3. ``lmc.stages`` (cached units: trained endpoints, alignments, curves, through the run store) and
   ``lmc.report`` (results files, plots, tracking);
4. ``lmc.studies`` — one module per study over the stages;
5. entry points — ``python -m lmc.run``, ``lmc.figures``, ``lmc.collect``, ``lmc.data``.

The core as plain functions, without Hydra::

    data = lmc.load_dataset("mnist1d")
    model_a = lmc.seeded_init(lambda: lmc.build_model("mlp", data.input_shape, data.num_classes), 0)
    lmc.train(model_a, data, lmc.TrainConfig(epochs=30), data_seed=0)
    spec = lmc.permutation_spec(model_a, data.x_train[:2])
    perm = lmc.weight_matching(spec, params_a, params_b)
    aligned_b = lmc.apply_permutation(spec, perm, model_b.state_dict())

Other alignment methods return the same kind of permutation: ``lmc.activation_matching(spec, model_a,
model_b, batches)``, ``lmc.ste(spec, model, sd_a, sd_b, batches)``, ``lmc.sinkhorn(spec, model, sd_a,
sd_b, batches)``; several models: ``lmc.align_to_reference``, ``lmc.merge_many``, ``lmc.pairwise_barriers``.

Merging models that share a basin (children fine-tuned from one parent, or aligned models)::

    soup = lmc.uniform_soup([child.state_dict() for child in children])
    greedy = lmc.greedy_soup(model, state_dicts, x_val, y_val)        # .state_dict, .kept, .steps
    stock = lmc.model_stock(parent.state_dict(), state_dicts)         # .state_dict, .ratios per tensor
    fishers = [lmc.fisher_diagonal(model, sd, batches) for sd in state_dicts]
    merged = lmc.fisher_merge(state_dicts, fishers)
    grams = [lmc.gram_matrices(model, sd, batches) for sd in state_dicts]
    merged = lmc.regmean_merge(state_dicts, grams, alpha=0.1)

and ``lmc.ensemble_evaluate``, ``lmc.swa``, ``lmc.plane_grid`` (the loss on the plane through three models).
"""

from lmc.core.barriers import barrier, barriers_from_curves, frankle_barrier, layerwise_barriers, midpoint_barrier
from lmc.core.data import Dataset, load_dataset
from lmc.core.interpolation import alpha_grid, layerwise_sweep, lerp_state, pairwise_barriers, sweep
from lmc.core.merging import (
    ensemble_evaluate,
    fisher_diagonal,
    fisher_merge,
    gram_matrices,
    greedy_soup,
    model_stock,
    regmean_merge,
    swa,
    uniform_soup,
)
from lmc.core.models import build_model
from lmc.core.permutation import (
    PermutationSpec,
    UnsupportedOperationError,
    activation_matching,
    align_to_reference,
    apply_permutation,
    invert_permutation,
    matching_objective,
    merge_many,
    permutation_spec,
    random_permutation,
    sinkhorn,
    ste,
    weight_matching,
    weight_matching_restarts,
)
from lmc.core.plane import plane_grid
from lmc.core.training import TrainConfig, evaluate, seeded_init, train

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "PermutationSpec",
    "TrainConfig",
    "UnsupportedOperationError",
    "activation_matching",
    "align_to_reference",
    "alpha_grid",
    "apply_permutation",
    "barrier",
    "barriers_from_curves",
    "build_model",
    "ensemble_evaluate",
    "evaluate",
    "fisher_diagonal",
    "fisher_merge",
    "frankle_barrier",
    "gram_matrices",
    "greedy_soup",
    "invert_permutation",
    "layerwise_barriers",
    "layerwise_sweep",
    "lerp_state",
    "load_dataset",
    "matching_objective",
    "merge_many",
    "midpoint_barrier",
    "model_stock",
    "pairwise_barriers",
    "permutation_spec",
    "plane_grid",
    "random_permutation",
    "regmean_merge",
    "seeded_init",
    "sinkhorn",
    "ste",
    "swa",
    "sweep",
    "train",
    "uniform_soup",
    "weight_matching",
    "weight_matching_restarts",
]
