"""Alignment diagnostics: how far apart two models are, before and after aligning B to A.

* ``l2_before`` / ``l2_after``: ‖θ_A − θ_B‖ over the given parameters, without and with the permutation;
* ``objective_before`` / ``objective_after``: the weight-matching objective Σ <W_A, π(W_B)>;
* per layer (every entry of ≥ 2 axes, reshaped to ``(out, -1)``): the top-k singular values of A's and
  B's weight matrices (a permutation leaves them unchanged) and the alignment |cos| of the i-th left
  and right singular vectors of A and B before and after alignment (Ito et al. 2024).
"""

from __future__ import annotations

import torch

from lmc.core.permutation import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    matching_objective,
)

__all__ = ["alignment_diagnostics"]


def _l2(a: dict, b: dict) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def _svd(w: torch.Tensor):
    u, s, vh = torch.linalg.svd(w.detach().double().cpu().reshape(w.shape[0], -1), full_matrices=False)
    return u, s, vh


def _cos(x: torch.Tensor, y: torch.Tensor, k: int) -> list[float]:
    return [float(v) for v in (x[:, :k] * y[:, :k]).sum(0).abs()]


def alignment_diagnostics(
    spec: PermutationSpec,
    params_a: dict[str, torch.Tensor],
    params_b: dict[str, torch.Tensor],
    perm: Permutation | None,
    top_k: int = 3,
) -> dict:
    """Diagnostics of aligning ``params_b`` to ``params_a`` by ``perm`` (``None``: identity)."""
    perm = perm if perm is not None else identity_permutation(spec)
    keys = [k for k in params_a if k in params_b and params_a[k].is_floating_point()]
    a = {k: params_a[k].detach() for k in keys}
    b = {k: params_b[k].detach() for k in keys}
    aligned = apply_permutation(spec, perm, b)
    layers = {}
    for key in keys:
        if a[key].dim() < 2:
            continue
        ua, sa, va = _svd(a[key])
        ub, sb, vb = _svd(b[key])
        uc, _, vc = _svd(aligned[key])
        k = min(top_k, len(sa))
        layers[key] = {
            "sv_a": [float(x) for x in sa[:k]],
            "sv_b": [float(x) for x in sb[:k]],
            "left_before": _cos(ua, ub, k),
            "left_after": _cos(ua, uc, k),
            "right_before": _cos(va.T, vb.T, k),
            "right_after": _cos(va.T, vc.T, k),
        }
    return {
        "l2_before": _l2(a, b),
        "l2_after": _l2(a, aligned),
        "objective_before": matching_objective(spec, identity_permutation(spec), a, b),
        "objective_after": matching_objective(spec, perm, a, b),
        "layers": layers,
    }
