# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # lmc as a library: train two models, align them, sweep α
#
# Every stage of `python -m lmc.run` is a plain function; no Hydra needed. This notebook trains two
# small MLPs on MNIST-1D from different seeds, aligns B to A by weight matching and compares the
# loss barrier with and without alignment. `LMC_NOTEBOOK_EPOCHS` shortens training (the tests set it).

# %%
import os

import lmc
from lmc import (
    TrainConfig,
    alpha_grid,
    barriers_from_curves,
    build_model,
    evaluate,
    load_dataset,
    seeded_init,
    sweep,
    train,
)

epochs = int(os.environ.get("LMC_NOTEBOOK_EPOCHS", "30"))
data = load_dataset("mnist1d")  # generated locally, cached under $DATA_DIR or ./data

# %%
models = []
for seed in (0, 1):
    model = seeded_init(lambda: build_model("mlp", data.input_shape, data.num_classes, width=256, depth=2), seed)
    train(model, data, TrainConfig(epochs=epochs), data_seed=seed, progress=False)
    models.append(model)
    print(f"seed {seed}: test loss/acc", evaluate(model, data.x_test, data.y_test))

# %%
model_a, model_b = models
spec = lmc.permutation_spec(model_a, data.x_train[:2])
perm = lmc.weight_matching(spec, dict(model_a.named_parameters()), dict(model_b.named_parameters()))
aligned_b = lmc.apply_permutation(spec, perm, model_b.state_dict())
print(spec)

# %%
splits = {"test": (data.x_test, data.y_test)}
alphas = alpha_grid(11)
rows = sweep(model_a, model_a.state_dict(), model_b.state_dict(), alphas, splits, "naive")
rows += sweep(model_a, model_a.state_dict(), aligned_b, alphas, splits, "weight_matching")
barriers = barriers_from_curves(rows)
for method, per_split in barriers.items():
    print(f"{method:>16}: test loss barrier {per_split['test']['loss']:.3f}, "
          f"error barrier {per_split['test']['error']:.3f}")
