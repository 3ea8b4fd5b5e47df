"""Permutation specs of torchvision's classification models: which are aligned, which are refused and why,
and what deriving the spec and one weight matching cost.

    python experiments/benchmarks/torchvision_specs.py [--only TEXT] [--max-params N] [--threads N]
        [--init identity|sequential]

Every model of ``torchvision.models.list_models(module=torchvision.models)``, at random initialisation
(``weights=None``, 10 classes) on a small input (:func:`example_shape`): :func:`lmc.permutation_spec` is timed
(tracing both modes and running the model once on the input; on the ``meta`` device, without weights, where
it refuses or where the model has more than ``--max-params`` parameters). Where it derives a spec and the
model has at most ``--max-params`` parameters, a random permutation of the model is checked to preserve its
outputs (the relative error), and one weight matching of the permuted copy onto the original is timed, and
checked to give back the original state dict exactly (``recovered``). Entries initialisation leaves
constant (norm weights, running statistics, zero biases, layer scales) are made random first, so that a
wrong permutation of them would show; the output error is the larger of evaluation mode and training mode
(without dropout and stochastic depth, so that both models compute deterministically; it covers
training-only branches such as auxiliary heads). Prints a markdown table: model, status (aligned, or
refused and the reason), parameters, groups, pieces, spec time, output error, weight-matching time,
recovered.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
import warnings

import torch
import torchvision

from lmc.core.permutation import (
    UnsupportedOperationError,
    apply_permutation,
    permutation_spec,
    random_permutation,
    weight_matching,
)

MODELS = torchvision.models.list_models(module=torchvision.models)


def example_shape(name: str) -> tuple[int, ...]:
    """A small input the model accepts in both modes: 64×64, except where the architecture needs more
    (Inception v3's auxiliary head in training mode; Swin's and MaxViT's windows) or takes its size as an
    option (ViT, see :func:`options`)."""
    if name == "inception_v3":
        return (3, 299, 299)
    if name.startswith(("swin", "maxvit")):
        return (3, 224, 224)
    if name.startswith("vit"):
        return (3, options(name)["image_size"], options(name)["image_size"])
    return (3, 64, 64)


def options(name: str) -> dict:
    kwargs = {"weights": None, "num_classes": 10}
    if name.startswith("vit"):
        kwargs["image_size"] = 28 if name.endswith("14") else 32
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # (their default warns that it will change)
    return kwargs


def build(name: str, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """torchvision's ``name`` at a seeded random initialisation (on ``meta``: built there when its constructor
    allows, else built on the CPU and moved)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if str(device) == "meta":
            try:
                with torch.device("meta"):
                    return torchvision.models.get_model(name, **options(name))
            except (NotImplementedError, RuntimeError):  # a constructor computing with tensors
                pass
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torchvision.models.get_model(name, **options(name)).to(device)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


@torch.no_grad()
def randomize_constants(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every floating-point entry that initialisation left constant (norm weights and biases,
    running statistics, zero biases, ConvNeXt's layer scales of 1e-6): permuting such an entry wrongly would
    change nothing, so the output check could not see it."""
    gen = torch.Generator().manual_seed(seed)
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.numel() > 1 and bool((value == value.flatten()[0]).all()):
            noise = torch.randn(value.shape, generator=gen)
            value.copy_(noise.abs() * 0.5 + 0.5 if "running_var" in key else noise * 0.5)


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """No dropout nor stochastic depth (for comparing outputs in training mode)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)):
            m.p = 0.0
    return model


def output_error(model: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor, training: bool) -> float:
    """Largest relative difference between the two models' outputs (every output of a tuple)."""
    a, b = copy.deepcopy(model).train(training), copy.deepcopy(other).train(training)
    with torch.no_grad():
        ya, yb = _deterministic(a)(x), _deterministic(b)(x)
    ya, yb = (ya,) if isinstance(ya, torch.Tensor) else tuple(ya), (yb,) if isinstance(yb, torch.Tensor) else tuple(yb)
    return max(float((u - v).norm() / u.norm().clamp_min(1e-30)) for u, v in zip(ya, yb))


def check(name: str, max_params: float = float("inf"), init: str = "sequential", seed: int = 0) -> dict:
    """One model's row: derive its spec (timed); if derived and small enough, the output error of a random
    permutation and one timed weight matching of the permuted copy onto the original."""
    model = build(name, "meta")
    size = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, *example_shape(name), generator=torch.Generator().manual_seed(seed))
    row = {"model": name, "params": size, "status": "aligned", "reason": "", "groups": None, "pieces": None,
           "spec_s": None, "error": None, "wm_s": None, "recovered": None}
    start = time.perf_counter()
    try:  # first on the meta device: a refusal, or a model too large to check, needs no weights
        spec = permutation_spec(model, x.to("meta"))
    except UnsupportedOperationError as exc:
        row["spec_s"] = time.perf_counter() - start
        row.update(status="refused", reason=re.sub(r"^cannot derive a permutation spec for \w+: ", "", str(exc)))
        return row
    row.update(spec_s=time.perf_counter() - start, groups=len(spec.groups), pieces=len(spec.pieces))
    if size > max_params:
        return row
    model = build(name, seed=seed)
    start = time.perf_counter()
    spec = permutation_spec(model, x)
    row["spec_s"] = time.perf_counter() - start
    randomize_constants(model, seed)
    model.eval()
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(spec, random_permutation(spec, seed + 1), model.state_dict()))
    row["error"] = max(output_error(model, permuted, x, training) for training in (False, True))
    start = time.perf_counter()
    found = weight_matching(spec, parameters(model), parameters(permuted), init=init)
    row["wm_s"] = time.perf_counter() - start
    back = apply_permutation(spec, found, permuted.state_dict())
    row["recovered"] = all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    return row


def markdown(rows: list[dict]) -> str:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = ["| model | status | parameters | groups | pieces | spec (s) | output error | weight matching (s) | "
             "recovered |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] if not r["reason"] else f"refused: {r['reason']}"
        recovered = "—" if r["recovered"] is None else ("yes" if r["recovered"] else "**no**")
        lines.append(f"| {r['model']} | {status} | {r['params'] / 1e6:.1f}M | {num(r['groups'], 'd')} | "
                     f"{num(r['pieces'], 'd')} | {num(r['spec_s'], '.2f')} | {num(r['error'], '.1e')} | "
                     f"{num(r['wm_s'], '.2f')} | {recovered} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", metavar="TEXT", help="only the models whose name contains TEXT")
    parser.add_argument("--max-params", type=float, default=150e6,
                        help="check and weight-match models of at most this many parameters (default 150e6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--init", default="sequential", choices=("identity", "sequential"),
                        help="weight matching's start (default sequential)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in MODELS if args.only is None or args.only in n]
    if not names:
        parser.error(f"--only {args.only!r} matches no model")
    rows = []
    for name in names:
        rows.append(check(name, args.max_params, args.init))
        r = rows[-1]
        print(f"{name}: {r['status']} {r['reason'][:100]} spec {r['spec_s']:.2f}s"
              + (f", wm {r['wm_s']:.2f}s, recovered {r['recovered']}" if r["wm_s"] is not None else ""), flush=True)
    print()
    print(markdown(rows))
    aligned = sum(r["status"] == "aligned" for r in rows)
    print(f"\n{aligned} of {len(rows)} aligned; {len(rows) - aligned} refused.")


if __name__ == "__main__":
    main()
