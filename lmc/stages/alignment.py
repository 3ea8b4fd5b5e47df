"""The alignment stage: the permutation of B that aligns it to A, with its diagnostics, through the store.

Stored under ``alignments/<hash>/perm.pt``, keyed by the method's settings and both models' store
hashes, so a sweep over interpolation settings aligns a pair once.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter

from torch import nn

from lmc.core.alignment import align, align_many
from lmc.core.data import Dataset
from lmc.core.diagnostics import alignment_diagnostics
from lmc.core.permutation import Permutation, PermutationSpec
from lmc.io import load_verified, save_atomic
from lmc.stages.settings import AlignSettings
from lmc.stages.store import Store

__all__ = ["Aligned", "aligned_pair", "aligned_to_first"]


@dataclass
class Aligned:
    perm: Permutation | None  # None: no alignment (align.method=none)
    diagnostics: dict | None
    hash: str | None  # the store entry (None when not stored)
    reused: bool


def aligned_pair(
    store: Store,
    settings: AlignSettings,
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    hashes: tuple[str, str],
    data: Dataset | None,
) -> Aligned:
    """The permutation aligning ``model_b`` (store hash ``hashes[1]``) to ``model_a`` (``hashes[0]``) by the
    configured method, and its diagnostics; from the store, or computed and stored."""
    method = settings.build()

    def compute():
        perm = align(method, spec, model_a, model_b, data)
        params = [dict(m.named_parameters()) for m in (model_a, model_b)]
        return perm, alignment_diagnostics(spec, *params, perm)

    key = {"align": settings.identity(), "a": hashes[0], "b": hashes[1]}
    (perm, diagnostics), h, reused = store.cached(
        "alignments", key, compute,
        lambda path, value: save_atomic(path / "perm.pt", dict(zip(("perm", "diagnostics"), value))),
        lambda path: itemgetter("perm", "diagnostics")(load_verified(path / "perm.pt")))
    return Aligned(perm, diagnostics, h, reused)


def aligned_to_first(settings: AlignSettings, spec: PermutationSpec, models: list[nn.Module],
                     data: Dataset | None) -> list[Permutation]:
    """Permutations bringing every model into the first one's frame (``align.merge``: each to the first,
    or Git Re-Basin's MergeMany); not stored (they depend on every model at once)."""
    return align_many(settings.build(), settings.merge, spec, models, data)
