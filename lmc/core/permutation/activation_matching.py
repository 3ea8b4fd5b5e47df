"""Activation matching (Git Re-Basin §3.1; Li et al. 2016; Tatro et al. 2020).

Run both models on the same training batches, record the activations at every permutation point
(each traced tensor whose features a Linear/Conv layer reads — post-activation outputs, and every
block input along a residual stream), and for each group match A's units to B's by one linear
assignment on the correlation (or inner product) of their activations. Spatial positions and batch
items are samples; the points of one residual stream are concatenated as more samples. Statistics are
accumulated in float64. A group with no activation point (features no layer reads, such as the unread
pieces of a ``split``) keeps the identity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from scipy.optimize import linear_sum_assignment
from torch import fx, nn

from lmc.core.permutation.apply import Permutation
from lmc.core.permutation.spec import PermutationSpec, trace
from lmc.errors import ConfigError

__all__ = ["activation_matching", "ACTIVATION_SIMILARITIES"]

ACTIVATION_SIMILARITIES = ("correlation", "inner_product")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


def _samples(x: torch.Tensor, dim: int, block: int, offset: int = 0, n: int | None = None) -> torch.Tensor:
    """(samples, n) view of an activation's ``n`` features (in blocks of ``block``) from entry ``offset`` of
    axis ``dim`` (all of it if ``n`` is None)."""
    x = x.movedim(dim, -1)
    if n is not None:
        x = x[..., offset:offset + n * block]
    n = x.shape[-1] // block
    x = x.reshape(*x.shape[:-1], n, block).movedim(-1, -2)
    return x.reshape(-1, n)


class _Stats:
    def __init__(self, n: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.sa, self.sb, self.saa, self.sbb, self.sab = 0, z(n), z(n), z(n), z(n), z(n, n)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def similarity(self, kind: str) -> torch.Tensor:
        if kind == "inner_product":
            return self.sab / self.count
        ma, mb = self.sa / self.count, self.sb / self.count
        cov = self.sab / self.count - torch.outer(ma, mb)
        sd_a = (self.saa / self.count - ma**2).clamp_min(0).sqrt()
        sd_b = (self.sbb / self.count - mb**2).clamp_min(0).sqrt()
        return cov / (torch.outer(sd_a, sd_b) + 1e-12)


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[torch.Tensor],
    similarity: str = "correlation",
) -> Permutation:
    """The permutation of B whose units' activations best match A's on ``batches`` (model inputs).

    ``similarity`` is ``correlation`` (Pearson, the default) or ``inner_product`` (uncentred second
    moment). Both models are run in eval mode. Returns ``{group: LongTensor}``.
    """
    if similarity not in ACTIVATION_SIMILARITIES:
        raise ConfigError(f"unknown activation similarity '{similarity}'; valid: {', '.join(ACTIVATION_SIMILARITIES)}")
    wanted = {point.node for pts in spec.points.values() for point in pts}
    gms = [trace(m, training=False) for m in (model_a, model_b)]  # the graph whose node names the points use
    was = [model_a.training, model_b.training]
    stats: dict[str, _Stats] = {}
    try:
        for gm in gms:
            gm.eval()
        with torch.no_grad():
            for x in batches:
                recs = [_Recorder(gm, wanted) for gm in gms]
                for rec in recs:
                    rec.run(x)
                for g, pts in spec.points.items():
                    n = spec.sizes[g]
                    for p in pts:
                        a = _samples(recs[0].values[p.node], p.dim, p.block, p.offset, n)
                        b = _samples(recs[1].values[p.node], p.dim, p.block, p.offset, n)
                        stats.setdefault(g, _Stats(n, a.device)).add(a, b)
    finally:
        model_a.train(was[0])
        model_b.train(was[1])
    if not stats and any(spec.points.values()):
        raise ValueError("activation matching needs at least one batch")
    perm = {}
    for g, n in spec.sizes.items():
        if g not in stats:  # no layer reads the group's features (the unread part of a split): nothing to match
            perm[g] = torch.arange(n)
            continue
        _, col = linear_sum_assignment(stats[g].similarity(similarity).cpu().numpy(), maximize=True)
        perm[g] = torch.from_numpy(col).long()
    return perm
