"""Study ``dropout_stability``: dropout stability of SGD solutions and the piecewise-linear path between two
of them (Shevchenko & Mondelli, "Landscape connectivity and dropout stability of SGD solutions for
over-parameterized neural networks", ICML 2020).

    seed pairs ─► A, B (store) ─► per model: keep a fraction p of each hidden layer (seeded samples), ×1/p
               ─► per pair: the linear path and the piecewise-linear dropout path ─► barriers ─► mean ± std

Their claim: the wider the network, the more dropout stable its SGD solution (removing part of every hidden
layer's units and rescaling the rest by 1/p changes the loss little), and two dropout-stable solutions are
joined by a piecewise-linear path — through their half-dropped, rescaled networks — whose loss barrier
vanishes with width, while the straight line between them keeps one.

``seeds`` are paired in order, ``(seeds[0], seeds[1]), …``; every model is an ordinary stored model (the
pair study's for the same seed pair). Per model and split, :func:`lmc.core.dropout.dropout_stability` keeps
``round(p·n)`` of the ``n`` units of every hidden layer (``study.samples`` random subsets drawn from
``study.sample_seed``), rescales their outgoing weights by ``n/k`` and reports the dropout network's loss and
error minus the full model's (the *dropout instability*, mean over the samples). Per pair,
:func:`lmc.core.dropout.compare_paths` sweeps the linear path (``linear``, naive) and the dropout path
(``dropout_path``, ``interp.num_alphas`` points on each of its five segments, halves drawn from
``study.path_seed``), and with ``align.method`` other than ``none`` the linear path after aligning B to A
(its name). Barriers: lmc's default (max over the path minus the linear baseline between the end points) and
the paper's ε (``*_excess``: max along the path minus the larger end point).

``results.json`` tables:

- ``pairs``; ``endpoints``: ``{seed: {split: {loss, acc}}}``;
- ``stability``: ``{seed: {split: {loss, error, dropped_loss, dropped_error, loss_gap, error_gap}}}``;
- ``dropout``: ``{split: {loss_gap, loss_gap_std, error_gap, error_gap_std, n}}``: mean and sample std over models;
- ``paths``: one row per pair, path and split (``pair, path, split, loss, error, loss_excess, error_excess``);
- ``barriers``: ``{path: {split: {loss, error, loss_excess, error_excess, *_std}}}`` (mean ± std over pairs;
  what ``lmc.figures --sweep`` plots).

``curves.csv``: each pair's paths (``method`` = path, ``alpha`` the position along the whole path,
``segment`` 0–4 on the dropout path, ``pair``). Figures: ``paths.png`` (loss and error along each path, mean ±
std over pairs); for a width sweep, ``python -m lmc.figures --sweep DIR --x model.width`` adds
``dropout_vs_model.width.png`` (dropout instability and both paths' barriers against width).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import matplotlib
import numpy as np
from tqdm.auto import tqdm

from lmc.core.dropout import compare_paths, dropout_path, dropout_stability, hidden_groups
from lmc.core.interpolation import alpha_grid
from lmc.core.permutation import apply_permutation, permutation_spec
from lmc.core.permutation.declared import declares_symmetry
from lmc.core.training import evaluate, seeded_init
from lmc.errors import ConfigError
from lmc.settings import Min, NonNegativeInt, PositiveInt
from lmc.stages.endpoints import Recipe, Seeds, seed_models
from lmc.stages.settings import RunSettings
from lmc.studies import Context, StudyResult
from lmc.studies.common import SPLITS, check_pairs, compare, mean_std, save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["DropoutStability"]

BARRIERS = ("loss", "error", "loss_excess", "error_excess")


class DropoutStability:
    """Dropout stability and the piecewise-linear dropout path beside the linear one (Shevchenko & Mondelli)."""

    name = "dropout_stability"

    @dataclass
    class Settings:
        p: Annotated[float, Min(0, strict=True)]  # fraction of each hidden layer's units kept
        samples: PositiveInt  # random subsets per model
        sample_seed: NonNegativeInt  # draws them
        path_seed: NonNegativeInt  # draws the halves of the dropout path

    def check(self, run: RunSettings, options: Any) -> None:
        check_pairs(run, self.name)
        if not options.p <= 1:
            raise ConfigError(f"study.p is the fraction of units kept, in (0, 1], got {options.p}")
        if run.spawn.step is not None or run.data.split != "none":
            raise ConfigError("study=dropout_stability trains every model on the whole training set from its own "
                              "init; use spawn.step=null and data.split=none")
        if declares_symmetry(run.model.cls):
            raise ConfigError(f"study=dropout_stability drops the units of a traced permutation spec, but model "
                              f"{run.model.name} declares its own symmetry; valid: mlp, vgg, cnn1d")
        if run.align.merge != "none" or run.align.target:
            raise ConfigError("study=dropout_stability aligns one pair at a time by a built-in align.method (or none); "
                              "set align.merge=none and align._target_=null")

    def run(self, ctx: Context) -> StudyResult:
        s, o, timings = ctx.settings, ctx.options, ctx.timings
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {split: data.split(split) for split in SPLITS}
        pairs = check_pairs(s, self.name)
        seeds = [x for p in pairs for x in p]
        recipe = Recipe(s.data, data, s.model, s.train, ctx.device)
        recipe.check()
        probe = seeded_init(recipe.build, seeds[0])
        spec = permutation_spec(probe, data.x_train[:2])
        hidden_groups(spec, probe.state_dict())  # a residual stream is refused before anything is trained
        dropout_path(spec, probe.state_dict(), probe.state_dict())  # so is a hidden layer of one unit
        if not spec.groups:
            raise ConfigError(f"model {s.model.name} has no hidden units to drop (its permutation spec is empty)")

        with timings("train"):
            stored = seed_models(ctx.store, recipe, [Seeds(x, x, x) for x in seeds], tags=[str(x) for x in seeds],
                                 progress=ctx.progress)
        by_seed = dict(zip(seeds, stored))
        hashes = {f"model/{x}": m.hash for x, m in by_seed.items()}
        reused = {f"model/{x}": m.reused for x, m in by_seed.items()}
        batch = s.interp.eval_batch_size
        endpoints = {str(x): {split: dict(zip(("loss", "acc"), evaluate(m.model, *xy, batch)))
                              for split, xy in splits.items()} for x, m in by_seed.items()}

        stability = {}
        with timings("dropout"):
            for x, m in tqdm(by_seed.items(), desc="dropout stability", disable=not ctx.progress, leave=False):
                stability[str(x)] = {}
                for split, (xs, ys) in splits.items():
                    st = dropout_stability(m.model, spec, m.model.state_dict(), xs, ys, p=o.p, samples=o.samples,
                                           seed=o.sample_seed, batch_size=batch)
                    stability[str(x)][split] = {"loss": st.loss, "error": st.error, "dropped_loss": st.dropped_loss,
                                                "dropped_error": st.dropped_error, "loss_gap": st.loss_gap,
                                                "error_gap": st.error_gap}

        alphas = alpha_grid(s.interp.num_alphas)
        rows, paths = [], []
        for k, (p, q) in enumerate(tqdm(pairs, desc="paths", disable=not ctx.progress, leave=False)):
            a, b = by_seed[p], by_seed[q]
            with timings("paths"):
                path_rows, barriers = compare_paths(a.model, spec, a.model.state_dict(), b.model.state_dict(),
                                                    splits, alphas, seed=o.path_seed, batch_size=batch)
            if s.align.method != "none":  # the linear path after aligning B to A, and its dropout path
                aligned = compare(ctx, spec, a.model, b.model, (a.hash, b.hash), s.align.method, data, splits)
                hashes[f"align/{k}"], reused[f"align/{k}"] = aligned["hashes"]["align"], aligned["reused"]["align"]
                sd_b = apply_permutation(spec, aligned["perm"], b.model.state_dict())
                with timings("paths"):
                    more, more_barriers = compare_paths(a.model, spec, a.model.state_dict(), sd_b, splits, alphas,
                                                        seed=o.path_seed, batch_size=batch)
                label = s.align.method
                path_rows += [{**r, "method": f"{r['method']}_{label}"} for r in more]
                barriers.update({f"{path}_{label}": v for path, v in more_barriers.items()})
            rows += [{**r, "pair": k} for r in path_rows]
            paths += [{"pair": k, "path": path, "split": split, **{m: v[m] for m in BARRIERS}}
                      for path, per_split in barriers.items() for split, v in per_split.items()]

        tables = {
            "pairs": [list(p) for p in pairs],
            "endpoints": endpoints,
            "stability": stability,
            "dropout": _dropout_table(stability),
            "paths": paths,
            "barriers": _barrier_table(paths),
            "p": o.p,
            "hidden_groups": {g: spec.sizes[g] for g in spec.groups},
        }
        return StudyResult(tables, rows, hashes, reused, {str(x): m for x, m in by_seed.items()}, seeds)

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        d = results["dropout"]
        lines = [f"experiment {results['experiment']}  pairs {results['pairs']}  keep p = {results['p']:g}",
                 "dropout instability (dropped − full; mean ± std over models): "
                 + "; ".join(f"{split} loss {d[split]['loss_gap']:.4f} ± {d[split]['loss_gap_std']:.4f}, "
                             f"error {100 * d[split]['error_gap']:.2f} ± {100 * d[split]['error_gap_std']:.2f} points"
                             for split in SPLITS),
                 "path barriers (mean ± std over pairs; error in points; excess = max − larger end point)",
                 f"  {'path':<26}" + "".join(f"{f'{split} {m}':>22}" for split in SPLITS
                                              for m in ("loss", "loss_excess", "error"))]
        for path, per_split in results["barriers"].items():
            cells = ""
            for split in SPLITS:
                b = per_split[split]
                cells += f"{b['loss']:>13.4f} ± {b['loss_std']:<6.4f}"
                cells += f"{b['loss_excess']:>13.4f} ± {b['loss_excess_std']:<6.4f}"
                cells += f"{100 * b['error']:>13.2f} ± {100 * b['error_std']:<6.2f}"
            lines.append(f"  {path:<26}{cells}")
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for i, method in enumerate(methods):
            for split, style in (("train", "-"), ("test", "--")):
                sel = [r for r in rows if r["method"] == method and r["split"] == split]
                alphas = sorted({float(r["alpha"]) for r in sel})
                by_pair: dict = {}
                for r in sel:
                    by_pair.setdefault(r["pair"], {})[float(r["alpha"])] = r
                for ax, metric in zip(axes, ("loss", "error")):
                    values = np.array([[float(c[a]["loss"]) if metric == "loss" else 1 - float(c[a]["acc"])
                                        for a in alphas] for c in by_pair.values()])
                    mean = values.mean(0)
                    std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(alphas))
                    ax.plot(alphas, mean, style, color=f"C{i}", label=f"{method} ({split})")
                    if split == "train":
                        ax.fill_between(alphas, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        for ax, metric in zip(axes, ("loss", "error")):
            for t in np.linspace(0, 1, 6)[1:-1]:
                ax.axvline(t, color="k", lw=0.3, ls=":")
            ax.set_xlabel("position along the path (dropout path: 5 segments, dotted)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        config = results["config"]
        model = config["model"]
        options = " ".join(f"{k}={v}" for k, v in model.items() if k not in ("name", "_target_"))
        title = (f"{results['experiment']}: {model.get('name')} {options} on {config['data'].get('name')}, "
                 f"{len(results['pairs'])} pairs (mean ± std), keep p={results['p']:g}")
        return [save_figure(fig, Path(run_dir) / "paths.png", title)]

    @staticmethod
    def sweep_figure(sweep_dir: Path, jobs: list[dict], x: str, split: str) -> Path:
        """Dropout instability (over models) and each path's loss barrier (over pairs) against ``x``, pooled
        over the jobs that share an ``x`` value: ``dropout_vs_<x>.png``. ``jobs``: ``(x value, results)``."""
        xs = sorted({v for v, _ in jobs})
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        gaps = {v: [m[split]["loss_gap"] for vv, r in jobs if vv == v for m in r["stability"].values()] for v in xs}
        _errorbar(axes[0], xs, gaps, "C3", "dropout: loss(keep p) − loss")
        paths = list(dict.fromkeys(p["path"] for _, r in jobs for p in r["paths"]))
        for ax, metric in zip(axes[1:], ("loss", "error")):
            for i, path in enumerate(paths):
                values = {v: [p[metric] for vv, r in jobs if vv == v for p in r["paths"]
                              if p["path"] == path and p["split"] == split] for v in xs}
                _errorbar(ax, xs, values, f"C{i}", path)
            ax.set_ylabel(f"{metric} barrier ({split})")
        axes[0].set_ylabel(f"dropout instability ({split} loss)")
        for ax in axes:
            ax.set_xlabel(x)
            if all(isinstance(v, (int, float)) for v in xs) and len(xs) > 1 and min(xs) > 0:
                ax.set_xscale("log", base=2)
            ax.axhline(0, color="k", lw=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        p = jobs[0][1]["p"]
        return save_figure(fig, Path(sweep_dir) / f"dropout_vs_{x}.png",
                           f"dropout stability (keep p={p:g}) and path barriers against {x}: {sweep_dir}")


def _errorbar(ax, xs, values: dict, color: str, label: str) -> None:
    pts = [(v, *mean_std(values[v])) for v in xs if values[v]]
    if pts:
        px, mean, std = zip(*pts)
        ax.errorbar(px, mean, yerr=std, color=color, marker="o", capsize=3, label=label)


def _dropout_table(stability: dict) -> dict:
    out = {}
    for split in SPLITS:
        entry = {"n": len(stability)}
        for metric in ("loss_gap", "error_gap"):
            entry[metric], entry[f"{metric}_std"] = mean_std([m[split][metric] for m in stability.values()])
        out[split] = entry
    return out


def _barrier_table(paths: list[dict]) -> dict:
    out: dict = {}
    for path in dict.fromkeys(p["path"] for p in paths):
        for split in SPLITS:
            sel = [p for p in paths if p["path"] == path and p["split"] == split]
            entry = out.setdefault(path, {}).setdefault(split, {"n": len(sel)})
            for metric in BARRIERS:
                entry[metric], entry[f"{metric}_std"] = mean_std([p[metric] for p in sel])
    return out
