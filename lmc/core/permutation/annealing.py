"""Simulated annealing over permutations (Entezari et al., "The role of permutation invariance in linear
mode connectivity", ICLR 2022), as their code runs it (``rahimentezari/PermutationInvariance``,
``barrier.py``: ``barrier_SA`` with the ``simanneal`` package's ``Annealer.anneal``):

* the state is one permutation per group (their ``init_state``: one index list per layer);
* a move swaps two random units in *every* group at once — per group two independent uniform draws
  ``a, b`` (``a = b`` is possible and leaves that group alone), their ``move``;
* the energy is the barrier at α = ½ on fixed training batches: the midpoint's metric minus the mean of
  the end points' metric (their ``energy``: mean end-point accuracy minus the midpoint's top-1 accuracy on
  the first training batch, in percent; here ``metric="error"`` is that as a fraction, ``metric="loss"``
  the cross-entropy). The end-point term is constant: it shifts energies, never decisions;
* ``simanneal``'s exponential schedule ``T = t_start · exp(−ln(t_start / t_end) · s / steps)`` at step
  ``s = 1 … steps``; a move that raises the energy by ``dE > 0`` is undone if
  ``exp(−dE / T) < u`` with ``u`` uniform in [0, 1); the best state seen (strictly lower energy) is
  returned. Their defaults: 50 000 steps, ``tmax = 25000``, ``tmin = 2.5`` on energies in percent
  (``t_start = 250``, ``t_end = 0.025`` for ``metric="error"``, which is a fraction).

The models are evaluated in eval mode with every floating-point state entry interpolated (BatchNorm's
running statistics too), as their ``interpolate_state_dicts`` + ``model.eval()`` do.

It is slow by nature: one forward pass per proposal. What this implementation saves is everything around
that pass. All moves and acceptance draws are drawn up front from a generator seeded by ``seed`` (they do
not depend on the state). The midpoint lives in the parameters of a copy of the model, updated in place: a
swap rewrites only the positions of the two units it exchanges (undone the same way on rejection), and
the energy is a plain forward call of that copy — no permuted state dict, no midpoint dict, no
``load_state_dict`` or ``functional_call`` per proposal. The midpoint is computed as
``(θ_A + π(θ_B)) · 0.5`` everywhere, so the energies equal a rebuild-everything evaluation bit for bit.

With ``proposals > 1`` the next few proposals are evaluated from the current state in one forward pass
(:func:`torch.func.vmap` over stacked candidate midpoints) and walked through in order up to the first
accepted one; the rest were speculative and are dropped. As the draws are fixed per step, the decisions
are those of the one-at-a-time run (the batched forward pass may round differently in the last bit); the
batch size follows the acceptance rate. Whether this pays depends on the device: it saves per-call
overhead of many small forward passes and costs building the stacked candidates and the proposals thrown
away (``experiments/benchmarks/annealing.py`` measures it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from lmc.core.permutation.apply import Permutation, apply_permutation, identity_permutation
from lmc.core.permutation.spec import PermutationSpec
from lmc.errors import ConfigError

__all__ = [
    "ANNEALING_METRICS",
    "ANNEALING_SCHEDULES",
    "AnnealingResult",
    "anneal",
    "annealing",
    "batch_metric",
    "draw_moves",
    "temperatures",
]

ANNEALING_METRICS = ("loss", "error")
ANNEALING_SCHEDULES = ("exponential", "linear")

# batched proposals: the running acceptance rate is an exponential average with this weight on the newest
# batch; the next batch holds about 1 / rate proposals (the expected wait for an acceptance), at most
# ``proposals``
ACCEPT_RATE_WEIGHT = 0.2
# the rate the average starts from (an early schedule accepts most moves: start with small batches)
ACCEPT_RATE_START = 0.5


@dataclass
class AnnealingResult:
    """What :func:`anneal` found: the best permutation and its energy, and the run's trace."""

    permutation: Permutation  # best state seen
    energy: float  # its energy (midpoint barrier on the batches)
    initial_energy: float
    energies: np.ndarray  # (steps,) energy of each step's proposal (float64)
    accepted: np.ndarray  # (steps,) whether each proposal was accepted
    evaluations: int  # forward passes of candidate midpoints (≥ steps with batched proposals)


def temperatures(steps: int, t_start: float, t_end: float, schedule: str = "exponential") -> np.ndarray:
    """Temperature at steps ``1 … steps`` (simanneal's exponential cooling, or linear), float64."""
    s = np.arange(1, steps + 1, dtype=np.float64) / steps
    if schedule == "exponential":
        return t_start * np.exp(-math.log(t_start / t_end) * s)
    return t_start + (t_end - t_start) * s


def draw_moves(spec: PermutationSpec, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every step's move and acceptance draw, from a generator seeded by ``seed``: ``swaps[s, g] = (a, b)``
    (the units swapped in group ``spec.groups[g]`` at step ``s``) and ``uniforms[s]`` in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    swaps = [torch.randint(spec.sizes[g], (steps, 2), generator=gen) for g in spec.groups]
    uniforms = torch.rand(steps, generator=gen, dtype=torch.float64)
    stacked = torch.stack(swaps, 1) if swaps else torch.zeros(steps, 0, 2, dtype=torch.long)
    return stacked.numpy(), uniforms.numpy()


def batch_metric(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    metric: str,
) -> float:
    """Mean cross-entropy (``loss``) or error rate (``error``) of ``model`` (with ``params`` swapped in by
    :func:`torch.func.functional_call`, if given) on ``batches``; per-example values summed in float64.
    The model's mode is the caller's."""
    if params is None:
        return _metric(model, batches, metric)
    return _metric(lambda x: functional_call(model, dict(params), (x,)), batches, metric)


def _metric(forward, batches, metric: str) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in batches:
            total += _per_example(forward(x), y, metric).sum().item()
            count += len(y)
    return total / count


def _per_example(out: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Float64 per-example loss or error of logits ``out`` (``(..., N, C)``) against labels ``y``."""
    if metric == "loss" and out.dim() == 2:
        return F.cross_entropy(out.float(), y, reduction="none").double()
    if metric == "loss":
        flat = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.expand(out.shape[:-1]).reshape(-1),
                               reduction="none")
        return flat.view(out.shape[:-1]).double()
    return (out.argmax(-1) != y).double()


def _check(spec, steps, t_start, t_end, schedule, metric, proposals, batches) -> None:
    if steps < 1:
        raise ConfigError(f"align.steps must be a positive integer, got {steps}")
    if not (t_start > 0 and t_end > 0):
        raise ConfigError(f"align.t_start and align.t_end must be positive, got {t_start} and {t_end}")
    if schedule not in ANNEALING_SCHEDULES:
        raise ConfigError(f"unknown align.schedule '{schedule}'; valid: {', '.join(ANNEALING_SCHEDULES)}")
    if metric not in ANNEALING_METRICS:
        raise ConfigError(f"unknown align.metric '{metric}'; valid: {', '.join(ANNEALING_METRICS)}")
    if proposals < 1:
        raise ConfigError(f"align.proposals must be a positive integer, got {proposals}")
    if not batches:
        raise ConfigError("annealing needs at least one training batch (align.num_batches ≥ 1)")


class _Midpoint:
    """The midpoint ``(θ_A + π(θ_B)) · 0.5`` of the current state, held as the parameters of a copy of the
    model and updated in place, so that evaluating it is a plain forward call.

    Every floating-point entry of A, of ``π(θ_B)`` and of the midpoint lives in one flat buffer each (the
    copy's parameters and buffers are views of the midpoint's). ``units[g][u]`` lists the buffer positions of
    unit ``u`` of group ``g`` on every axis the group acts on. A swap of units ``a, b`` exchanges their
    positions in ``π(θ_B)``, group after group (an entry permuted on two axes sees both swaps), then
    recomputes the midpoint at the positions touched with the formula of a rebuild — so the midpoint is
    always bitwise what a rebuild would give, at a cost that does not grow with the rest of the model. A
    swap is its own inverse: undoing a rejected move repeats it.
    """

    def __init__(self, spec: PermutationSpec, model: nn.Module, sd_a: Mapping, sd_b: Mapping, perm: Permutation):
        self.spec = spec
        self.perm = {g: p.tolist() for g, p in perm.items()}  # lists: cheap to swap entries of
        keys = [k for k, v in sd_a.items() if v.is_floating_point()]
        self.shapes = {k: sd_a[k].shape for k in keys}
        offsets = np.cumsum([0] + [sd_a[k].numel() for k in keys]).tolist()
        self.offsets = dict(zip(keys, offsets))
        permuted_b = apply_permutation(spec, perm, {k: sd_b[k].detach() for k in keys})
        self.a = torch.cat([sd_a[k].detach().reshape(-1) for k in keys]) if keys else torch.zeros(0)
        self.permuted_b = torch.cat([permuted_b[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)
        self.mid = (self.a + self.permuted_b) * 0.5
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.module.load_state_dict(sd_a)
        for k in keys:
            owner, name = _owner(self.module, k)
            view = self.entry(self.mid, k)
            if name in owner._parameters:
                owner._parameters[name].data = view
            else:
                owner._buffers[name] = view
        device = self.a.device
        self.units: dict[str, torch.Tensor] = {}
        for g in spec.groups:
            n = spec.sizes[g]
            cols = [(torch.arange(self.shapes[r.key].numel(), device=device).view(self.shapes[r.key])
                     .movedim(r.axis, 0).reshape(n, -1) + self.offsets[r.key])
                    for r in spec.perm_to_axes[g] if r.key in self.offsets]
            self.units[g] = torch.cat(cols, 1) if cols else torch.zeros(n, 0, dtype=torch.long, device=device)
        self.moving = [k for k in keys if any(spec.axes_to_perm.get(k, ()))]  # entries a move can change

    def entry(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        """Entry ``key`` as a view of a flat buffer (``flat`` may carry leading batch axes)."""
        start = self.offsets[key]
        return flat[..., start : start + self.shapes[key].numel()].unflatten(-1, self.shapes[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def permutation(self) -> Permutation:
        return {g: torch.tensor(p, dtype=torch.long) for g, p in self.perm.items()}

    def swap(self, move: np.ndarray) -> None:
        """Swap units ``move[g] = (a, b)`` in every group ``g`` (in ``spec.groups`` order)."""
        touched = []
        for g, (a, b) in zip(self.spec.groups, move.tolist()):
            if a == b:
                continue
            p = self.perm[g]
            p[a], p[b] = p[b], p[a]
            units = self.units[g]
            pair, swapped = torch.cat((units[a], units[b])), torch.cat((units[b], units[a]))
            self.permuted_b.index_copy_(0, pair, self.permuted_b.index_select(0, swapped))
            touched.append(pair)
        if touched:
            at = torch.cat(touched) if len(touched) > 1 else touched[0]
            self.mid.index_copy_(0, at, (self.a.index_select(0, at) + self.permuted_b.index_select(0, at)) * 0.5)

    def candidates(self, moves: np.ndarray) -> dict[str, torch.Tensor]:
        """The midpoints after each of ``moves`` (``(K, groups, 2)``), applied alone to the current state:
        ``{key: (K, *shape)}`` for the entries a move changes."""
        k = len(moves)
        source = torch.arange(len(self.a), device=self.a.device).repeat(k, 1)  # π(θ_B) of candidate i: [source[i]]
        rows = torch.arange(k, device=self.a.device)[:, None]
        for gi, g in enumerate(self.spec.groups):
            first = self.units[g][torch.from_numpy(moves[:, gi, 0]).to(self.a.device)]  # (K, positions)
            second = self.units[g][torch.from_numpy(moves[:, gi, 1]).to(self.a.device)]
            source[rows, first], source[rows, second] = source[rows, second], source[rows, first]
        stacked = (self.a + self.permuted_b[source]) * 0.5
        return {key: self.entry(stacked, key) for key in self.moving}


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def anneal(
    spec: PermutationSpec,
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int = 50_000,
    t_start: float = 250.0,
    t_end: float = 0.025,
    schedule: str = "exponential",
    metric: str = "error",
    proposals: int = 1,
    init: Permutation | None = None,
    seed: int = 0,
) -> AnnealingResult:
    """Simulated annealing for the permutation of B that minimises the midpoint barrier to A on ``batches``.

    ``batches`` are fixed ``(x, y)`` training batches, the same at every step (their code: one batch).
    ``init`` is the starting state (default the identity; their code starts from a random permutation
    seeded by B's model id). ``proposals`` > 1 evaluates up to that many proposals per forward pass
    (see the module docstring); it changes the speed, not the decisions. Temperatures are in the units of
    ``metric`` (a fraction for ``error``).
    """
    batches = list(batches)
    _check(spec, steps, t_start, t_end, schedule, metric, proposals, batches)
    temps = temperatures(steps, t_start, t_end, schedule)
    moves, uniforms = draw_moves(spec, steps, seed)
    start = identity_permutation(spec) if init is None else {g: torch.as_tensor(p).long() for g, p in init.items()}
    was_training = model.training
    model.eval()
    try:
        state = _Midpoint(spec, model, sd_a, sd_b, start)
        ends = 0.5 * (batch_metric(model, sd_a, batches, metric) + batch_metric(model, sd_b, batches, metric))
        many = _many_forward(state) if proposals > 1 else None
        energy = _metric(state.forward, batches, metric) - ends
        initial, best, best_perm = energy, energy, state.permutation()
        energies = np.empty(steps)
        accepted = np.zeros(steps, dtype=bool)
        rate, evaluations, step = ACCEPT_RATE_START, 0, 0

        def accept(s: int, new: float) -> bool:
            """The Metropolis rule at step ``s`` for a proposal of energy ``new`` (simanneal's test)."""
            energies[s] = new
            delta = new - energy
            accepted[s] = not (delta > 0.0 and math.exp(-delta / temps[s]) < uniforms[s])
            return accepted[s]

        while step < steps:
            size = 1 if many is None else int(min(proposals, steps - step, max(1, round(1 / max(rate, 1e-6)))))
            if size == 1:
                state.swap(moves[step])
                if not accept(step, _metric(state.forward, batches, metric) - ends):
                    state.swap(moves[step])  # a swap undoes itself
                taken = 1
            else:
                proposed = (_many_metric(many, state, moves[step : step + size], batches, metric) - ends).tolist()
                taken = len(proposed)
                for offset, new in enumerate(proposed):  # in order, up to the first accepted proposal
                    if accept(step + offset, new):
                        state.swap(moves[step + offset])
                        taken = offset + 1
                        break
            if accepted[step + taken - 1]:
                energy = float(energies[step + taken - 1])
                if energy < best:
                    best, best_perm = energy, state.permutation()
            evaluations += size
            rate = (1 - ACCEPT_RATE_WEIGHT) * rate + ACCEPT_RATE_WEIGHT * float(accepted[step + taken - 1]) / taken
            step += taken
    finally:
        model.train(was_training)
    return AnnealingResult(best_perm, best, initial, energies, accepted, evaluations)


def _many_forward(state: _Midpoint):
    """``forward(stacked, x) -> (K, N, C)``: the model on ``x`` with each of K candidate midpoints."""
    def one(moving: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(state.module, moving, (x,))  # the entries no move changes: the copy's own

    return vmap(one, in_dims=(0, None))


def _many_metric(many, state: _Midpoint, moves: np.ndarray, batches, metric: str) -> np.ndarray:
    stacked = state.candidates(moves)
    total, count = np.zeros(len(moves)), 0
    with torch.no_grad():
        for x, y in batches:
            total += _per_example(many(stacked, x), y, metric).sum(-1).cpu().numpy()
            count += len(y)
    return total / count


def annealing(
    spec: PermutationSpec,
    model: nn.Module,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int = 50_000,
    t_start: float = 250.0,
    t_end: float = 0.025,
    schedule: str = "exponential",
    metric: str = "error",
    proposals: int = 1,
    init: Permutation | None = None,
    seed: int = 0,
) -> Permutation:
    """The permutation of B found by :func:`anneal` (the best state seen); arguments as there."""
    return anneal(spec, model, sd_a, sd_b, batches, steps=steps, t_start=t_start, t_end=t_end, schedule=schedule,
                  metric=metric, proposals=proposals, init=init, seed=seed).permutation
