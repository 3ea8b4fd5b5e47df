"""Study ``over_training``: barriers between two models at every epoch of their training (Git Re-Basin,
Ainsworth et al. ICLR 2023, Fig. 3), and Frankle et al.'s error barrier against the spawn step
(Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020).

    seed pairs ─► A, B trained with a checkpoint kept every ``study.every`` epochs (store)
              ─► at every kept epoch: align B to A by each method ─► α sweep ─► barriers ─► mean ± std
    seed pairs ─► a parent trained k steps (each k of ``study.spawn_steps``) ─► two children ─► naive barrier

Over training: ``seeds`` are paired in order, ``(seeds[0], seeds[1]), …``; each model is trained once
(every seed its init, data-order and augmentation seed) with ``train.keep_checkpoints`` set to every
``study.every``-th epoch and the last (kept checkpoints are bookkeeping, not identity: a model already
stored without them is replayed from its seeds, :func:`lmc.stages.endpoints.kept_states`). Epoch 0 is the
initialisation. At every kept epoch, B's checkpoint is aligned to A's by each of ``study.methods``
(``naive``: not at all; otherwise a built-in ``align.method``, with ``align.*``'s options when
``align.method`` names it) and the linear path is swept; alignments and curves are stored per checkpoint
pair. Git Re-Basin shows the aligned barrier falling as training goes on while the naive one does not.

Spawning: for each pair ``(p, q)`` and each ``k`` of ``study.spawn_steps``, the parent (seed ``p``)
trains ``k`` optimiser steps and two children continue from its full training state with data-order
seeds ``p`` and ``q`` — the pair study's ``spawn.step=k`` with ``seeds=[p,q]`` (``sweep=spawn_step``), so
the store shares their models. Their naive error barrier on the test split against ``k``, with
``study.stability`` (2%) the line below which Frankle et al. call the children stable. The error barrier
there is Frankle's: max over α minus the mean of the end points (``error_frankle``); the default barrier is
reported too.

``results.json`` tables:

- ``pairs``; ``endpoints``: ``{seed: {split: {loss, acc}}}`` of the trained models;
- ``epochs``: the kept epochs (0 first); ``steps``: their optimiser steps;
- ``over_training``: ``{method: {split: {loss, error, loss_std, error_std}}}``, each a list over
  ``epochs`` (mean and sample std over pairs; error as a fraction);
- ``per_epoch``: one row per pair, epoch, method and split (``pair, epoch, step, method, split, loss, error,
  loss_midpoint, error_midpoint, loss_frankle, error_frankle``);
- ``barriers``: the last epoch's ``{method: {split: {loss, error, …_std}}}`` (what ``lmc.figures --sweep`` plots);
- ``spawn``: one row per pair, step and split (``pair, step, split, loss, error, error_frankle``);
  ``instability``: ``{split: {steps, error_frankle, error_frankle_std, loss, loss_std}}``; ``stability``.

``curves.csv``: every curve, with ``pair``, ``epoch`` (over-training) or ``spawn_step`` columns. Figure:
``over_training.png`` (loss and error barrier against epoch per method, mean ± std over pairs; Frankle's
error barrier against spawn step with the stability line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import matplotlib
import numpy as np
from tqdm.auto import tqdm

from lmc.core.permutation import permutation_spec
from lmc.core.training import evaluate, seeded_init
from lmc.errors import ConfigError
from lmc.settings import Min, NonNegativeInt, PositiveInt, show
from lmc.stages.endpoints import Recipe, Seeds, kept_states, seed_models, spawned_models
from lmc.stages.settings import RunSettings
from lmc.studies import Context, StudyResult
from lmc.studies.common import SPLITS, check_methods, check_pairs, compare, mean_std, save_figure, with_state

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["OverTraining"]

METRICS = ("loss", "error", "loss_midpoint", "error_midpoint", "loss_frankle", "error_frankle")


class OverTraining:
    """Barriers over training (Git Re-Basin Fig. 3) and against spawn step (Frankle et al.), per method."""

    name = "over_training"

    @dataclass
    class Settings:
        methods: list[str]  # naive and/or built-in align methods, one curve each
        every: PositiveInt  # a checkpoint every this many epochs (and the last)
        spawn_steps: list[NonNegativeInt]  # Frankle's spawn steps k; [] = no spawning
        stability: Annotated[float, Min(0, strict=True)]  # the error-barrier line of "stable" (0.02)

    def check(self, run: RunSettings, options: Any) -> None:
        check_pairs(run, self.name)
        check_methods(options.methods, run)
        if len(set(options.spawn_steps)) != len(options.spawn_steps):
            raise ConfigError(f"study.spawn_steps must be distinct steps, got {show(options.spawn_steps)}")
        if not options.stability < 1:
            raise ConfigError(f"study.stability is an error barrier (a fraction) in (0, 1), got {options.stability}")
        if run.spawn.step is not None or run.data.split != "none":
            raise ConfigError("study=over_training trains every model on the whole training set (it spawns "
                              "children itself, study.spawn_steps); use spawn.step=null and data.split=none")
        if options.every > run.train.epochs:
            raise ConfigError(f"study.every={options.every} is more than train.epochs={run.train.epochs}: "
                              "no checkpoint would be kept")

    @staticmethod
    def kept_epochs(every: int, epochs: int) -> list[int]:
        """Every ``every``-th epoch and the last (epoch 0, the initialisation, is added by the study)."""
        return sorted({*range(every, epochs + 1, every), epochs})

    # ------------------------------------------------------------------------------------------ run

    def run(self, ctx: Context) -> StudyResult:
        s, o, timings = ctx.settings, ctx.options, ctx.timings
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {split: data.split(split) for split in SPLITS}
        pairs = check_pairs(s, self.name)
        seeds = [x for p in pairs for x in p]
        epochs = self.kept_epochs(o.every, s.train.epochs)
        steps_per_epoch = math.ceil(len(data.y_train) / s.train.batch_size)
        total = steps_per_epoch * s.train.epochs
        bad = [k for k in o.spawn_steps if k > total]
        if bad:
            raise ConfigError(f"study.spawn_steps {bad} beyond training: steps must be in [0, {total}] "
                              "(train.epochs × steps per epoch)")
        keep = [f"{e}ep" for e in epochs]
        recipe = Recipe(s.data, data, s.model, replace(s.train, keep_checkpoints=keep), ctx.device)
        recipe.check()
        with timings("train"):
            stored = seed_models(ctx.store, recipe, [Seeds(x, x, x) for x in seeds], tags=[str(x) for x in seeds],
                                 progress=ctx.progress)
            states = {}
            for x, m in zip(seeds, stored):
                kept = kept_states(ctx.store, m, recipe.settings(Seeds(x, x, x)), recipe.build, data, recipe.train,
                                   keep, progress=ctx.progress and f"replay {x} for its checkpoints")
                init = seeded_init(recipe.build, x).state_dict()
                states[x] = {0: init, **{step // steps_per_epoch: st["model"] for step, st in kept.items()}}
        by_seed = dict(zip(seeds, stored))
        hashes = {f"model/{x}": m.hash for x, m in by_seed.items()}
        reused = {f"model/{x}": m.reused for x, m in by_seed.items()}
        endpoints = {str(x): {split: dict(zip(("loss", "acc"), evaluate(m.model, *xy, s.interp.eval_batch_size)))
                              for split, xy in splits.items()} for x, m in by_seed.items()}

        spec = permutation_spec(stored[0].model, data.x_train[:2]) if o.methods != ["naive"] else None
        rows, per_epoch = [], []
        todo = [(k, p, e) for k, p in enumerate(pairs) for e in [0, *epochs]]
        for k, (p, q), epoch in tqdm(todo, desc="epochs", disable=not ctx.progress, leave=False):
            a, b = (with_state(recipe.build, states[x][epoch]) for x in (p, q))
            keys = (f"{by_seed[p].hash}@{epoch}ep", f"{by_seed[q].hash}@{epoch}ep")
            for method in o.methods:
                out = compare(ctx, spec, a, b, keys, method, data, splits)
                for role in out["hashes"]:
                    hashes[f"{role}/{method}/{k}/{epoch}"] = out["hashes"][role]
                    reused[f"{role}/{method}/{k}/{epoch}"] = out["reused"][role]
                rows += [{**r, "pair": k, "epoch": epoch} for r in out["rows"]]
                per_epoch += [{"pair": k, "epoch": epoch, "step": epoch * steps_per_epoch, "method": method,
                               "split": split, **{m: b[m] for m in METRICS}}
                              for split, b in out["barriers"].items()]

        spawn_rows = []
        if o.spawn_steps:
            plain = Recipe(s.data, data, s.model, s.train, ctx.device)
            for k, (p, q) in enumerate(pairs):
                for step in o.spawn_steps:
                    with timings("train"):
                        children, parent = spawned_models(ctx.store, plain, Seeds(p, p, p),
                                                          [Seeds(p, p, p), Seeds(p, q, q)], step, ["a", "b"],
                                                          ctx.progress)
                    for tag, m in (("parent", parent), ("a", children[0]), ("b", children[1])):
                        hashes[f"spawn/{step}/{k}/{tag}"], reused[f"spawn/{step}/{k}/{tag}"] = m.hash, m.reused
                    out = compare(ctx, None, children[0].model, children[1].model,
                                  (children[0].hash, children[1].hash), "naive", data, splits)
                    hashes[f"curves/spawn/{step}/{k}"] = out["hashes"]["curves"]
                    reused[f"curves/spawn/{step}/{k}"] = out["reused"]["curves"]
                    rows += [{**r, "pair": k, "spawn_step": step} for r in out["rows"]]
                    spawn_rows += [{"pair": k, "step": step, "split": split, **{m: b[m] for m in METRICS}}
                                   for split, b in out["barriers"].items()]

        over = _over_training(per_epoch, o.methods, [0, *epochs])
        last = epochs[-1]
        tables = {
            "pairs": [list(p) for p in pairs],
            "endpoints": endpoints,
            "epochs": [0, *epochs],
            "steps": [e * steps_per_epoch for e in [0, *epochs]],
            "over_training": over,
            "per_epoch": per_epoch,
            "barriers": {m: {split: {key: v[key][-1] for key in v} for split, v in per.items()}
                         for m, per in over.items()},
            "last_epoch": last,
            "spawn": spawn_rows,
            "instability": _instability(spawn_rows, o.spawn_steps),
            "stability": o.stability,
        }
        return StudyResult(tables, rows, hashes, reused, {str(x): m for x, m in by_seed.items()}, seeds)

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        over, epochs = results["over_training"], results["epochs"]
        lines = [f"experiment {results['experiment']}  pairs {results['pairs']}",
                 "barriers over training (test split; mean ± std over pairs; error in percentage points)",
                 f"  {'epoch':>6}" + "".join(f"{f'{m} loss':>22}{f'{m} error':>22}" for m in over)]
        shown = sorted({0, *epochs[:: max(1, len(epochs) // 6)], epochs[-1]})
        for e in shown:
            i = epochs.index(e)
            cells = ""
            for m in over:
                t = over[m]["test"]
                cells += f"{t['loss'][i]:>12.3f} ± {t['loss_std'][i]:<7.3f}"
                cells += f"{100 * t['error'][i]:>12.2f} ± {100 * t['error_std'][i]:<7.2f}"
            lines.append(f"  {e:>6}{cells}")
        inst = results.get("instability", {}).get("test")
        if inst:
            lines.append(f"Frankle's test error barrier against spawn step (stable below "
                         f"{100 * results['stability']:g} points):")
            for k, mean, std in zip(inst["steps"], inst["error_frankle"], inst["error_frankle_std"]):
                lines.append(f"  step {k:>6}: {100 * mean:.2f} ± {100 * std:.2f}"
                             + ("  stable" if mean < results["stability"] else ""))
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        over, epochs = results["over_training"], results["epochs"]
        inst = results.get("instability", {})
        panels = 3 if inst else 2
        fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.8))
        for i, method in enumerate(over):
            for split, style in (("train", "--"), ("test", "-")):
                for ax, metric in zip(axes, ("loss", "error")):
                    scale = 100 if metric == "error" else 1
                    mean = scale * np.array(over[method][split][metric])
                    std = scale * np.array(over[method][split][f"{metric}_std"])
                    ax.plot(epochs, mean, style, color=f"C{i}", marker=".", label=f"{method} ({split})")
                    if split == "test":
                        ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        for ax, metric in zip(axes, ("loss", "error")):
            ax.set_xlabel("epoch (0 = initialisation)")
            ax.set_ylabel(f"{metric} barrier" + (" (points)" if metric == "error" else ""))
            ax.axhline(0, color="k", lw=0.5)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        if inst:
            ax = axes[2]
            for split, style in (("train", "--"), ("test", "-")):
                if split not in inst:
                    continue
                x = np.array(inst[split]["steps"], dtype=float)
                mean = 100 * np.array(inst[split]["error_frankle"])
                std = 100 * np.array(inst[split]["error_frankle_std"])
                ax.errorbar(x, mean, yerr=std, fmt=style, marker="o", capsize=3, color="C3", label=f"naive ({split})")
            ax.axhline(100 * results["stability"], color="k", ls=":", label=f"{100 * results['stability']:g}% (stable)")
            if len(x) > 1 and x.max() >= 8:
                ax.set_xscale("symlog", linthresh=1)
                ax.set_xlim(left=0)
            ax.set_xlabel("spawn step k (optimiser steps)")
            ax.set_ylabel("error barrier, max − mean of ends (points)")
            ax.set_title("Frankle et al.: instability", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        config = results["config"]
        model = config["model"]
        options = " ".join(f"{k}={v}" for k, v in model.items() if k not in ("name", "_target_"))
        title = (f"{results['experiment']}: {model.get('name')} {options} on {config['data'].get('name')}, "
                 f"{len(results['pairs'])} pairs (mean ± std)")
        return [save_figure(fig, Path(run_dir) / "over_training.png", title)]


def _over_training(per_epoch: list[dict], methods: list[str], epochs: list[int]) -> dict:
    out: dict = {}
    for method in methods:
        for split in SPLITS:
            entry = out.setdefault(method, {}).setdefault(split, {})
            for metric in ("loss", "error"):
                stats = [mean_std([r[metric] for r in per_epoch
                                   if r["method"] == method and r["split"] == split and r["epoch"] == e])
                         for e in epochs]
                entry[metric] = [m for m, _ in stats]
                entry[f"{metric}_std"] = [sd for _, sd in stats]
    return out


def _instability(spawn_rows: list[dict], steps: list[int]) -> dict:
    if not spawn_rows:
        return {}
    steps = sorted(steps)
    out = {}
    for split in SPLITS:
        entry = {"steps": steps}
        for metric in ("error_frankle", "error", "loss"):
            stats = [mean_std([r[metric] for r in spawn_rows if r["split"] == split and r["step"] == k]) for k in steps]
            entry[metric], entry[f"{metric}_std"] = [m for m, _ in stats], [sd for _, sd in stats]
        out[split] = entry
    return out
