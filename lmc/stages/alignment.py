"""The alignment stage: what aligns B to A, with its diagnostics, through the store.

A model's symmetry is traced (:func:`lmc.core.permutation.permutation_spec`: a ``PermutationSpec``) unless
the model declares it (``model.symmetry()``, :mod:`lmc.core.permutation.declared`; the soft tree
ensembles' tree permutations, subtree flips and splitting orders). :func:`symmetry_of` picks one, and
the functions below take either: :func:`aligned_pair` aligns by ``align.method``, :func:`apply_alignment`
applies the answer to B's state dict, :func:`check_method` refuses, before anything is trained, a method
the model's kind of symmetry does not have.

A declared symmetry aligns by its own ``weight_matching`` (with every invariance it declares),
``activation_matching`` (on ``align.num_batches × align.batch_size`` training rows drawn with
``align.seed``; ``align.similarity`` does not apply) or ``none``; STE, Sinkhorn, MergeMany and a user's
``align._target_`` need a traced spec. Every declared alignment, computed or loaded from the store, is
checked to leave B's function unchanged on training rows: the relative output difference is recorded in
the diagnostics (``output_difference``), and one above
:data:`~lmc.core.permutation.declared.SAME_FUNCTION_TOLERANCE` stops the run naming the model.

Stored under ``alignments/<hash>/perm.pt``, keyed by the method's settings and both models' store
hashes, so a sweep over interpolation settings aligns a pair once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import torch
from torch import nn

from lmc.core.alignment import WeightMatching, align, align_many
from lmc.core.data import Dataset
from lmc.core.diagnostics import alignment_diagnostics
from lmc.core.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    permutation_spec,
)
from lmc.core.permutation.declared import (
    DECLARED_METHODS,
    SAME_FUNCTION_TOLERANCE,
    DeclaredSymmetry,
    declares_symmetry,
    function_change,
)
from lmc.errors import ConfigError, WrongSymmetry
from lmc.io import load_verified, save_atomic
from lmc.stages.settings import AlignSettings, ModelSettings
from lmc.stages.store import Store

__all__ = ["Aligned", "Symmetry", "aligned_pair", "aligned_to_first", "apply_alignment", "check_method",
           "checked_permutation",
           "declared_alignment", "symmetry_of"]

CHECK_ROWS = 512  # training rows on which an aligned model must compute B's function

Symmetry = PermutationSpec | DeclaredSymmetry


@dataclass
class Aligned:
    perm: Any  # a Permutation (traced spec), a declared symmetry's element, or None (align.method=none)
    diagnostics: dict | None
    hash: str | None  # the store entry (None when not stored)
    reused: bool


def symmetry_of(model: nn.Module, example: torch.Tensor) -> Symmetry:
    """The symmetry the model declares (``model.symmetry()``), else its spec traced on ``example``."""
    return model.symmetry() if declares_symmetry(model) else permutation_spec(model, example)


def check_method(settings: AlignSettings, model: ModelSettings) -> None:
    """A one-line ConfigError when the model declares its symmetry and ``align`` asks for what only a
    traced spec has (STE, Sinkhorn, a user's method, merging several models)."""
    if not declares_symmetry(model.cls):
        return
    if settings.target or settings.method not in DECLARED_METHODS:
        raise ConfigError(f"align.method={settings.method} needs a traced permutation spec, but model {model.name} "
                          f"declares its own symmetry; valid: {', '.join(DECLARED_METHODS)}")
    if settings.merge != "none":
        raise ConfigError(f"align.merge={settings.merge} needs a traced permutation spec, but model {model.name} "
                          "declares its own symmetry; valid: none")


def apply_alignment(spec: Symmetry, perm: Any, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B's state dict aligned by ``perm`` (``None``: unchanged)."""
    if perm is None:
        return dict(state_dict)
    if isinstance(spec, PermutationSpec):
        return apply_permutation(spec, perm, state_dict)
    return spec.apply(perm, state_dict)


def aligned_pair(
    store: Store,
    settings: AlignSettings,
    spec: Symmetry,
    model_a: nn.Module,
    model_b: nn.Module,
    hashes: tuple[str, str],
    data: Dataset | None,
) -> Aligned:
    """What aligns ``model_b`` (store hash ``hashes[1]``) to ``model_a`` (``hashes[0]``) by the configured
    method, and its diagnostics; from the store, or computed and stored."""
    if not isinstance(spec, PermutationSpec):
        options = {"invariances": list(spec.invariances)}
        if settings.method == "activation_matching":
            opts = settings.options
            options.update(num_samples=opts["num_batches"] * opts["batch_size"], seed=opts["seed"])
        return declared_alignment(store, spec, settings.method, options, model_a, model_b, hashes, data)
    method = settings.build()

    def compute():
        runs = method.runs(spec, model_a, model_b) if isinstance(method, WeightMatching) else None
        perm = runs.perm if runs is not None else align(method, spec, model_a, model_b, data)
        params = [dict(m.named_parameters()) for m in (model_a, model_b)]
        diagnostics = alignment_diagnostics(spec, *params, perm)
        if runs is not None:  # every restart's objective, and which was kept
            diagnostics["restarts"] = {"objectives": runs.objectives, "seeds": runs.seeds, "kept": runs.kept}
        return perm, diagnostics

    key = {"align": settings.identity(), "a": hashes[0], "b": hashes[1]}
    (perm, diagnostics), h, reused = store.cached(
        "alignments", key, compute,
        lambda path, value: save_atomic(path / "perm.pt", dict(zip(("perm", "diagnostics"), value))),
        lambda path: itemgetter("perm", "diagnostics")(load_verified(path / "perm.pt")))
    if perm is not None and data is not None:
        difference = checked_permutation(spec, perm, model_b, data.x_train[:CHECK_ROWS], settings.method)
        diagnostics = {**diagnostics, "output_difference": difference}
    return Aligned(perm, diagnostics, h, reused)


def checked_permutation(spec: PermutationSpec, perm: Permutation, model: nn.Module, x: torch.Tensor,
                        method: str) -> float:
    """The relative change of ``model``'s outputs on ``x`` when ``perm`` permutes its state dict
    (:func:`~lmc.core.permutation.declared.function_change`: evaluation mode, and training mode where it has
    BatchNorm). A permutation of a correct spec leaves the function unchanged up to rounding; one above
    :data:`SAME_FUNCTION_TOLERANCE` raises :class:`~lmc.errors.WrongSymmetry` naming the groups whose
    permutation alone changes the function, before any barrier is computed."""
    sd = model.state_dict()
    difference = function_change(model, sd, apply_permutation(spec, perm, sd), x)
    if difference <= SAME_FUNCTION_TOLERANCE:
        return difference
    identity = identity_permutation(spec)
    groups = [g for g in spec.sizes if not torch.equal(perm[g].cpu(), identity[g])
              and not function_change(model, sd, apply_permutation(spec, {**identity, g: perm[g]}, sd), x)
              <= SAME_FUNCTION_TOLERANCE]
    named = ", ".join(groups) if groups else "none alone (only their combination)"
    raise WrongSymmetry(f"{method}'s permutation changed the function of model {type(model).__qualname__}: "
                        f"relative output difference {difference:.3g} > {SAME_FUNCTION_TOLERANCE:g} on {len(x)} "
                        f"training rows; groups whose permutation alone changes it: {named}; the permutation spec "
                        "is wrong for this model (pass a correct spec, or report the model's operations)")


def declared_alignment(
    store: Store,
    symmetry: DeclaredSymmetry,
    method: str,
    options: Mapping[str, Any],
    model_a: nn.Module,
    model_b: nn.Module,
    hashes: tuple[str, str],
    data: Dataset,
) -> Aligned:
    """The element of a declared symmetry aligning ``model_b`` to ``model_a`` by ``method`` with
    ``options`` (``invariances``; ``num_samples`` and ``seed`` for activation matching), from the store or
    computed and stored; checked to leave B's function unchanged (ConfigError naming the model if not).
    Diagnostics: the invariances used, ‖θ_A − θ_B‖ before and after, and ``output_difference``."""
    if method not in DECLARED_METHODS:
        raise ConfigError(f"align.method={method} needs a traced permutation spec; a declared symmetry aligns by "
                          f"{', '.join(DECLARED_METHODS)}")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()

    def compute():
        element = symmetry.align(method, model_a, model_b, data.x_train, **options)
        aligned = symmetry.apply(element, sd_b)
        return element, {"invariances": list(options.get("invariances", symmetry.invariances)),
                         "l2_before": _distance(sd_a, sd_b), "l2_after": _distance(sd_a, aligned)}

    key = {"align": {"method": method, **options}, "a": hashes[0], "b": hashes[1]}
    (element, diagnostics), h, reused = store.cached(
        "alignments", key, compute,
        lambda path, value: save_atomic(path / "perm.pt", {"perm": value[0].to_dict(), "diagnostics": value[1]}),
        lambda path: _read_declared(symmetry, path))
    difference = function_change(model_b, sd_b, symmetry.apply(element, sd_b), data.x_train[:CHECK_ROWS])
    if not difference <= SAME_FUNCTION_TOLERANCE:
        model = f"{type(model_b).__module__}.{type(model_b).__qualname__}"
        raise WrongSymmetry(f"{method} of model {model} changed its function: relative output difference "
                          f"{difference:.3g} > {SAME_FUNCTION_TOLERANCE:g} on {len(data.x_train[:CHECK_ROWS])} "
                          "training rows; the symmetry the model declares (symmetry()) is wrong")
    return Aligned(element, {**diagnostics, "output_difference": difference}, h, reused)


def _read_declared(symmetry: DeclaredSymmetry, path) -> tuple[Any, dict]:
    stored = load_verified(path / "perm.pt")
    return symmetry.from_dict(stored["perm"]), stored["diagnostics"]


def _distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)


def aligned_to_first(settings: AlignSettings, spec: Symmetry, models: Sequence[nn.Module],
                     data: Dataset) -> tuple[list[Permutation], list[float]]:
    """Permutations bringing every model into the first one's frame (``align.merge``: each to the first,
    or Git Re-Basin's MergeMany), and each one's run-time check (:func:`checked_permutation`; 0 for the
    first model); not stored (they depend on every model at once). Traced specs only."""
    if not isinstance(spec, PermutationSpec):
        raise ConfigError(f"align.merge={settings.merge} needs a traced permutation spec; the model declares its "
                          "own symmetry; valid: align.merge=none")
    perms = align_many(settings.build(), settings.merge, spec, list(models), data)
    differences = [0.0] + [checked_permutation(spec, perm, model, data.x_train[:CHECK_ROWS],
                                               f"align.merge={settings.merge}")
                           for model, perm in zip(models[1:], perms[1:])]
    return perms, differences
