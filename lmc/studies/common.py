"""What the over_training, dropout_stability and permutation_invariance studies share: seed pairs, the
alignment methods a study compares (``naive`` and built-in ``align.method`` names), the stored curves and
barriers between two state dicts, mean ± std over pairs, and saving a figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from lmc.core.alignment import ALIGN_METHODS
from lmc.core.barriers import barriers_from_curves
from lmc.core.interpolation import alpha_grid
from lmc.core.normalization import resolve_reset_bn
from lmc.core.permutation import apply_permutation
from lmc.core.permutation.declared import declares_symmetry
from lmc.errors import ConfigError
from lmc.report.plotting import save_figure
from lmc.settings import show
from lmc.stages.alignment import aligned_pair
from lmc.stages.curves import interpolation_curves, stored_curves
from lmc.stages.settings import AlignSettings, RunSettings, check_seeds
from lmc.studies import Context

__all__ = ["METHODS", "align_settings", "check_methods", "check_pairs", "compare", "mean_std", "save_figure",
           "with_state"]

SPLITS = ("train", "test")
METHODS = ("naive", *(m for m in ALIGN_METHODS if m != "none"))  # what a study's ``methods`` may name


def check_pairs(run: RunSettings, study: str, one_seed_each: bool = True) -> list[tuple[int, int]]:
    """``seeds`` paired in order, ``(seeds[0], seeds[1]), (seeds[2], seeds[3])…``; a ConfigError unless an
    even number of distinct seeds, and, with ``one_seed_each``, unless data_seeds/aug_seeds are null (each
    model is one seed); without it they are checked to give one seed per model."""
    seeds = run.seeds
    if not isinstance(seeds, list) or len(seeds) < 2 or len(seeds) % 2:
        raise ConfigError(f"study={study} pairs the seeds in order, so it needs an even number of them, e.g. "
                          f"seeds=[0,1,2,3]; got {show(seeds)}")
    check_seeds(seeds, len(seeds))
    if not one_seed_each:
        for name in ("data_seeds", "aug_seeds"):
            if getattr(run, name) is not None:
                check_seeds(getattr(run, name), len(seeds), name=name, distinct=False)
    elif run.data_seeds is not None or run.aug_seeds is not None:
        raise ConfigError(f"study={study} seeds each model by one seed (init, data order, augmentation); "
                          "data_seeds and aug_seeds are not read: set them to null")
    return list(zip(seeds[0::2], seeds[1::2]))


def check_methods(methods: Sequence[str], run: RunSettings, key: str = "study.methods") -> None:
    """Distinct names among :data:`METHODS`; a model that declares its own symmetry only ``naive``."""
    if not methods or len(set(methods)) != len(methods) or any(m not in METHODS for m in methods):
        raise ConfigError(f"{key} must be distinct names among {', '.join(METHODS)}; got {show(methods)}")
    if declares_symmetry(run.model.cls) and any(m != "naive" for m in methods):
        raise ConfigError(f"{key}={show(methods)} aligns on a traced permutation spec, but model {run.model.name} "
                          "declares its own symmetry; choose another model or methods=[naive]")
    if run.align.target:
        raise ConfigError("align._target_ is not read by this study: it compares built-in methods by name "
                          f"({key}); set align._target_=null")


def align_settings(run: RunSettings, method: str) -> AlignSettings | None:
    """The settings of ``method`` (``None`` for naive): ``align.*``'s options when ``align.method`` names it,
    the method's defaults otherwise."""
    if method == "naive":
        return None
    if run.align.method == method:
        return replace(run.align, merge="none")
    return AlignSettings(method, None, "none", asdict(ALIGN_METHODS[method]()))


def with_state(build, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model from ``build()`` holding ``state`` (eval mode)."""
    model = build()
    model.load_state_dict(state)
    return model.eval()


def compare(
    ctx: Context,
    spec,
    model_a: nn.Module,
    model_b: nn.Module,
    keys: tuple[str, str],
    method: str,
    data,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    """B aligned to A by ``method`` (``naive``: not at all), the linear path swept over ``interp.num_alphas``
    values of α (whole model), both through the store under ``keys`` (the two models' store identities).
    Returns ``{rows, barriers: {split: {...}}, perm, hashes: {align, curves}, reused: {...}}``."""
    s = ctx.settings
    interp = replace(s.interp, layerwise=False)
    settings = align_settings(s, method)
    out: dict[str, Any] = {"hashes": {}, "reused": {}, "perm": None}
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    align_hash = None
    if settings is not None:
        with ctx.timings("align"):
            aligned = aligned_pair(ctx.store, settings, spec, model_a, model_b, keys, data)
        out["perm"], align_hash = aligned.perm, aligned.hash
        out["hashes"]["align"], out["reused"]["align"] = aligned.hash, aligned.reused
        sd_b = apply_permutation(spec, aligned.perm, sd_b)
    norm = {"reset_bn": resolve_reset_bn(interp.reset_bn, model_a), "repair": bool(interp.repair)}

    def compute():
        return interpolation_curves(interp, model_a, sd_a, sd_b, alpha_grid(interp.num_alphas), splits, method, {},
                                    data.x_train, norm)

    with ctx.timings("interpolate"):
        rows, h, reused = stored_curves(ctx.store, interp, method, {"a": keys[0], "b": keys[1],
                                                                     "alignment": align_hash}, compute)
    out["hashes"]["curves"], out["reused"]["curves"] = h, reused
    out["rows"] = rows
    out["barriers"] = next(iter(barriers_from_curves(rows).values()))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
