"""Study ``permutation_invariance``: Entezari et al.'s conjecture tested as they did ("The role of permutation
invariance in linear mode connectivity of neural networks", ICLR 2022; their code
``rahimentezari/PermutationInvariance``).

    seed pairs ─► real pairs: A, B from different inits (store)
              ─► oracle pairs: A, and B = A's init permuted at random, trained with A's seeds (store)
              ─► each method: align B to A ─► α sweep ─► barriers ─► mean ± std over pairs
              ─► oracle pairs: fraction of the naive barrier removed, fraction of planted units found

The conjecture: modulo permutations, SGD solutions have no barrier between them. Real pairs cannot prove
it (no method is known to find the best permutation), so they also build a pair for which a zero-barrier
permutation is known to exist — "our model": B is A permuted. Here (as :mod:`lmc.core.oracle` explains) B's
*initialisation* is a random permutation of A's (drawn from the pair's second seed) and B trains with A's
data-order and augmentation seeds, so B stays A permuted through training (up to float rounding) while the
naive barrier between them is that of two different-looking solutions. Every method is scored on the oracle
by how much of its naive barrier it removes and by the fraction of units where its permutation is the
planted one.

``seeds`` are paired in order, ``(p, q)``: the real pair is the models of seeds ``p`` and ``q`` (the pair
study's), the oracle pair ``p`` and ``oracle(p, q)``. ``study.methods``: ``naive`` and built-in
``align.method`` names (their paper: naive and simulated annealing, ``align=annealing``; ``align.*``'s options
apply to the method ``align.method`` names, the others run with their defaults). Their trainer runs until the
training loss is below a threshold: ``train.stop_loss`` (the sweep presets set 0.01 with ``train.epochs`` as
a cap); the epochs each model used are recorded.

``results.json`` tables:

- ``pairs``; ``models``: ``{name: {role, seed, hash, epochs, stopped, train: {loss, acc}, test: {loss, acc}}}``
  (names ``<p>``, ``<q>``, ``oracle<p>``; role ``a``, ``real_b``, ``oracle_b``);
- ``per_pair``: ``kind`` (``real``/``oracle``), ``pair``, ``method``, ``split``, ``loss``, ``error`` (and the
  midpoint and Frankle variants);
- ``barriers``: ``{"<kind>/<method>": {split: {loss, error, loss_std, error_std, n}}}`` (mean and sample std
  over pairs; what ``lmc.figures --sweep`` plots);
- ``oracle``: ``{method: {found, found_std, removed: {split: {loss, error, loss_std, error_std}}}}``: the
  fraction of units where the method's permutation is the planted one (``naive``: the identity's), and
  the fraction of the oracle's naive barrier it removes (NaN where the naive barrier is not positive);
- ``training``: epochs used (mean, min, max) and ``stop_loss``.

``curves.csv``: every curve, with ``kind`` and ``pair`` columns. Figures: ``barriers.png`` (each method's
barriers, real beside oracle, mean ± std with every pair); with a width or depth sweep, ``python -m
lmc.figures --sweep DIR --x model.width`` adds ``invariance_vs_model.width.png`` (barrier against the setting
per method, real solid, oracle dashed, and the planted units found).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from tqdm.auto import tqdm

from lmc.core.oracle import barrier_removed, permuted_copy, unit_agreement
from lmc.core.permutation import identity_permutation, permutation_spec
from lmc.core.training import evaluate, seeded_init, train
from lmc.errors import ConfigError
from lmc.stages.endpoints import Recipe, Seeds, StoredModel, seed_models, trained_model
from lmc.stages.settings import RunSettings
from lmc.studies import Context, StudyResult
from lmc.studies.common import SPLITS, check_methods, check_pairs, compare, mean_std, save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PermutationInvariance"]

KINDS = ("real", "oracle")
METRICS = ("loss", "error", "loss_midpoint", "error_midpoint", "loss_frankle", "error_frankle")


class PermutationInvariance:
    """Entezari et al. 2022: real pairs and oracle pairs (B = A permuted), barriers per method, planted units found."""

    name = "permutation_invariance"

    @dataclass
    class Settings:
        methods: list[str]  # naive and/or built-in align methods
        oracle: bool  # also the oracle pairs

    def check(self, run: RunSettings, options: Any) -> None:
        check_pairs(run, self.name)
        check_methods(options.methods, run)
        if run.spawn.step is not None or run.data.split != "none":
            raise ConfigError("study=permutation_invariance trains every model on the whole training set from its "
                              "own init; use spawn.step=null and data.split=none")
        if run.align.merge != "none":
            raise ConfigError("study=permutation_invariance aligns one pair at a time; set align.merge=none")

    # ------------------------------------------------------------------------------------------ run

    def run(self, ctx: Context) -> StudyResult:
        s, o, timings = ctx.settings, ctx.options, ctx.timings
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {split: data.split(split) for split in SPLITS}
        pairs = check_pairs(s, self.name)
        seeds = [x for p in pairs for x in p]
        recipe = Recipe(s.data, data, s.model, s.train, ctx.device)
        recipe.check()
        spec = permutation_spec(seeded_init(recipe.build, seeds[0]), data.x_train[:2])
        if o.oracle and not spec.groups:
            raise ConfigError(f"model {s.model.name} has no permutation groups: an oracle pair would be A itself")

        with timings("train"):
            stored = seed_models(ctx.store, recipe, [Seeds(x, x, x) for x in seeds], tags=[str(x) for x in seeds],
                                 progress=ctx.progress)
            by_seed = dict(zip(seeds, stored))
            oracles = {p: self._oracle(ctx, recipe, spec, p, q) for p, q in pairs} if o.oracle else {}
        roles = {str(p): ("a", p) for p, _ in pairs} | {str(q): ("real_b", q) for _, q in pairs} \
            | {f"oracle{p}": ("oracle_b", p) for p in oracles}
        models = {**{str(x): m for x, m in by_seed.items()}, **{f"oracle{p}": m for p, (m, _) in oracles.items()}}
        batch = s.interp.eval_batch_size
        table = {name: {"role": roles[name][0], "seed": roles[name][1], "hash": m.hash, "epochs": len(m.history),
                        "stopped": bool(m.history and m.history[-1].get("stopped")),
                        **{split: dict(zip(("loss", "acc"), evaluate(m.model, *xy, batch)))
                           for split, xy in splits.items()}}
                 for name, m in models.items()}
        hashes = {f"model/{name}": m.hash for name, m in models.items()}
        reused = {f"model/{name}": m.reused for name, m in models.items()}

        rows, per_pair, found = [], [], []
        todo = [(kind, k, p, q, method) for k, (p, q) in enumerate(pairs) for kind in KINDS
                if kind == "real" or o.oracle for method in o.methods]
        for kind, k, p, q, method in tqdm(todo, desc="pairs", disable=not ctx.progress, leave=False):
            a = by_seed[p]
            b = by_seed[q] if kind == "real" else oracles[p][0]
            out = compare(ctx, spec, a.model, b.model, (a.hash, b.hash), method, data, splits)
            for role in out["hashes"]:
                hashes[f"{role}/{kind}/{method}/{k}"] = out["hashes"][role]
                reused[f"{role}/{kind}/{method}/{k}"] = out["reused"][role]
            rows += [{**r, "method": method, "kind": kind, "pair": k} for r in out["rows"]]
            per_pair += [{"kind": kind, "pair": k, "method": method, "split": split, **{m: v[m] for m in METRICS}}
                         for split, v in out["barriers"].items()]
            if kind == "oracle":
                perm = out["perm"] if out["perm"] is not None else identity_permutation(spec)
                found.append({"pair": k, "method": method, **unit_agreement(perm, oracles[p][1])})

        epochs = [m["epochs"] for m in table.values()]
        tables = {
            "pairs": [list(p) for p in pairs],
            "models": table,
            "per_pair": per_pair,
            "barriers": _barrier_table(per_pair),
            "oracle": _oracle_table(per_pair, found, o.methods) if o.oracle else {},
            "found": found,
            "training": {"stop_loss": s.train.stop_loss, "max_epochs": s.train.epochs,
                         "epochs_mean": float(np.mean(epochs)), "epochs_min": min(epochs), "epochs_max": max(epochs),
                         "stopped": sum(m["stopped"] for m in table.values()), "models": len(table)},
            "groups": {g: spec.sizes[g] for g in spec.groups},
        }
        return StudyResult(tables, rows, hashes, reused, models, seeds)

    @staticmethod
    def _oracle(ctx: Context, recipe: Recipe, spec, p: int, q: int) -> tuple[StoredModel, dict]:
        """B of the oracle pair of ``(p, q)``: A's init (seed ``p``) permuted by the permutation drawn from
        ``q``, trained with A's data-order and augmentation seeds; and the planted answer (aligning B to A)."""
        init = seeded_init(recipe.build, p).state_dict()
        permuted, answer = permuted_copy(spec, init, q)
        settings = {**recipe.settings(Seeds(p, p, p)), "oracle": {"plant_seed": q}}

        def fit(model, data, cfg, data_seed, aug_seed, progress, checkpoints, stop_step=None, start=None):
            model.load_state_dict(permuted)  # a fresh model: training resumes from checkpoints, if any
            return train(model, data, cfg, data_seed=data_seed, aug_seed=aug_seed, progress=progress,
                         checkpoints=checkpoints, stop_step=stop_step, start=start)

        stored = trained_model(ctx.store, settings, recipe.build, recipe.dataset, recipe.train,
                               progress=ctx.progress and f"train oracle B of {p} (planted {q})", fit=fit)
        return stored, answer

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        t = results["training"]
        lines = [f"experiment {results['experiment']}  pairs {results['pairs']}  epochs used {t['epochs_mean']:.1f} "
                 f"({t['epochs_min']}–{t['epochs_max']}; {t['stopped']}/{t['models']} stopped below "
                 f"train.stop_loss={t['stop_loss']})",
                 "barriers (mean ± std over pairs; error in percentage points)",
                 f"  {'pair/method':<30}" + "".join(f"{f'{split} {m}':>20}" for m in ("loss", "error")
                                                   for split in SPLITS)]
        for label, per_split in results["barriers"].items():
            cells = ""
            for metric in ("loss", "error"):
                scale = 100 if metric == "error" else 1
                for split in SPLITS:
                    b = per_split[split]
                    cells += f"{scale * b[metric]:>11.3f} ± {scale * b[f'{metric}_std']:<6.3f}"
            lines.append(f"  {label:<30}{cells}")
        if results.get("oracle"):
            lines.append("oracle pairs: planted units found, fraction of the naive barrier removed "
                         "(test error, train loss)")
            for method, entry in results["oracle"].items():
                r = entry["removed"]
                lines.append(f"  {method:<30}found {entry['found']:.3f} ± {entry['found_std']:.3f}   removed "
                             f"{r['test']['error']:.3f} ± {r['test']['error_std']:.3f}, "
                             f"{r['train']['loss']:.3f} ± {r['train']['loss_std']:.3f}")
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        per_pair = results["per_pair"]
        methods = list(dict.fromkeys(r["method"] for r in per_pair))
        kinds = [k for k in KINDS if any(r["kind"] == k for r in per_pair)]
        panels = [("error", "test"), ("loss", "train")]
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(14, 3.9))
        width = 0.8 / len(kinds)
        for ax, (metric, split) in zip(axes, panels):
            scale = 100 if metric == "error" else 1
            for j, kind in enumerate(kinds):
                for i, method in enumerate(methods):
                    values = [scale * r[metric] for r in per_pair
                              if r["kind"] == kind and r["method"] == method and r["split"] == split]
                    mean, std = mean_std(values)
                    x = i + (j - (len(kinds) - 1) / 2) * width
                    ax.bar(x, mean, width, yerr=std, capsize=3, color=f"C{j}", alpha=0.7,
                           label=kind if i == 0 else None)
                    ax.scatter([x] * len(values), values, s=8, color="k", zorder=3)
            ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel(f"{split} {metric} barrier" + (" (points)" if metric == "error" else ""))
            ax.axhline(0, color="k", lw=0.5)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
        ax = axes[-1]
        found = results.get("found", [])
        for i, method in enumerate(methods):
            values = [f["all"] for f in found if f["method"] == method]
            if values:
                mean, std = mean_std(values)
                ax.bar(i, mean, 0.6, yerr=std, capsize=3, color="C1", alpha=0.7)
                ax.scatter([i] * len(values), values, s=8, color="k", zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("oracle: planted units found")
        ax.grid(alpha=0.3, axis="y")
        config = results["config"]
        model = config["model"]
        options = " ".join(f"{k}={v}" for k, v in model.items() if k not in ("name", "_target_"))
        t = results["training"]
        title = (f"{results['experiment']}: {model.get('name')} {options} on {config['data'].get('name')}, "
                 f"{len(results['pairs'])} pairs (mean ± std), epochs used {t['epochs_min']}–{t['epochs_max']} "
                 f"(stop_loss {t['stop_loss']})")
        return [save_figure(fig, Path(run_dir) / "barriers.png", title)]

    @staticmethod
    def sweep_figure(sweep_dir: Path, jobs: list[dict], x: str, split: str) -> Path:
        """Barrier against ``x`` per method, real pairs solid and oracle pairs dashed (mean ± std over the
        pairs of the jobs sharing an ``x`` value), and the oracle's planted units found:
        ``invariance_vs_<x>.png``. ``jobs``: ``(x value, results)``."""
        xs = sorted({v for v, _ in jobs})
        methods = list(dict.fromkeys(r["method"] for _, res in jobs for r in res["per_pair"]))
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
        for ax, metric in zip(axes, ("error", "loss")):
            scale = 100 if metric == "error" else 1
            for i, method in enumerate(methods):
                for kind, style in (("real", "-"), ("oracle", "--")):
                    pts = []
                    for v in xs:
                        values = [scale * r[metric] for vv, res in jobs if vv == v for r in res["per_pair"]
                                  if r["kind"] == kind and r["method"] == method and r["split"] == split]
                        if values:
                            pts.append((v, *mean_std(values)))
                    if pts:
                        px, mean, std = zip(*pts)
                        ax.errorbar(px, mean, yerr=std, fmt=style, marker="o", capsize=3, color=f"C{i}",
                                    label=f"{method} ({kind})")
            ax.set_ylabel(f"{split} {metric} barrier" + (" (points)" if metric == "error" else ""))
        ax = axes[2]
        for i, method in enumerate(methods):
            pts = [(v, *mean_std(vals)) for v in xs
                   if (vals := [f["all"] for vv, res in jobs if vv == v for f in res.get("found", [])
                                if f["method"] == method])]
            if pts:
                px, mean, std = zip(*pts)
                ax.errorbar(px, mean, yerr=std, marker="o", capsize=3, color=f"C{i}", label=method)
        ax.set_ylabel("oracle: planted units found")
        ax.set_ylim(-0.02, 1.05)
        for ax in axes:
            ax.set_xlabel(x)
            if all(isinstance(v, (int, float)) for v in xs) and len(xs) > 1 and min(xs) > 0:
                ax.set_xscale("log", base=2)
            ax.axhline(0, color="k", lw=0.5)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        axes[2].legend(fontsize=7)
        return save_figure(fig, Path(sweep_dir) / f"invariance_vs_{x}.png",
                           f"real (solid) and oracle (dashed) pairs against {x}: {sweep_dir}")


def _barrier_table(per_pair: list[dict]) -> dict:
    out: dict = {}
    for kind in KINDS:
        for method in dict.fromkeys(r["method"] for r in per_pair):
            for split in SPLITS:
                sel = [r for r in per_pair if r["kind"] == kind and r["method"] == method and r["split"] == split]
                if not sel:
                    continue
                entry = out.setdefault(f"{kind}/{method}", {}).setdefault(split, {"n": len(sel)})
                for metric in ("loss", "error"):
                    entry[metric], entry[f"{metric}_std"] = mean_std([r[metric] for r in sel])
    return out


def _oracle_table(per_pair: list[dict], found: list[dict], methods: list[str]) -> dict:
    naive = {(r["pair"], r["split"]): r for r in per_pair if r["kind"] == "oracle" and r["method"] == "naive"}
    out = {}
    for method in methods:
        values = [f["all"] for f in found if f["method"] == method]
        entry = {"found": mean_std(values)[0], "found_std": mean_std(values)[1], "removed": {}}
        for split in SPLITS:
            removed = entry["removed"].setdefault(split, {})
            for metric in ("loss", "error"):
                fractions = [barrier_removed(naive[(r["pair"], split)][metric], r[metric]) for r in per_pair
                             if r["kind"] == "oracle" and r["method"] == method and r["split"] == split
                             and (r["pair"], split) in naive]
                fractions = [f for f in fractions if not math.isnan(f)]
                removed[metric], removed[f"{metric}_std"] = mean_std(fractions) if fractions else (math.nan, math.nan)
        out[method] = entry
    return out
