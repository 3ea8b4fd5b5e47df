"""Study ``trees``: linear mode connectivity of soft tree ensembles modulo their symmetries (Kanoh & Sugiyama,
"Linear Mode Connectivity in Differentiable Tree Ensembles", ICLR 2025).

    data ─► learning rate by training accuracy ─► seed pairs ─► each variant: align B to A ─► 25 α ─► barriers

The paper's protocol: Adam, batch 512 (``train=trees``); the learning rate picked among
``study.learning_rates`` by the training accuracy of the model from ``seeds[0]`` (ties: the lower training
loss), then every model trained with it (all from the store, so a sweep trains each once); ``seeds``
paired in order, ``(seeds[0], seeds[1])``, ``(seeds[2], seeds[3])``, …; for each pair and each variant the
accuracy barrier of the linear path (the paper's Eq. 1, lmc's ``error`` barrier) on the training and test
splits, reported as mean ± std over the pairs. Variants, each where the model has it:

- ``naive``: no alignment;
- ``perm``, ``perm+flip``, ``perm+flip+order``: weight matching with the tree permutation only, plus
  subtree flips, plus splitting orders (the paper's ablations; :func:`lmc.core.permutation.trees.ablations`);
- ``activation``: activation matching with every invariance, on ``study.samples`` training rows.

A model without a declared symmetry (the paper's MLP comparison row, ``model=mlp``) gets ``naive``, ``perm``
(Git Re-Basin's weight matching of its traced spec) and ``activation`` (activation matching on
``study.samples`` rows). Declared alignments are checked to leave B's function unchanged (the alignment
stage). ``align.*`` and ``train.lr`` are not read; ``interp.num_alphas`` is the α grid (25 in the paper).

``results.json`` tables:

- ``learning_rate``: ``chosen``, ``train_acc`` and ``train_loss`` of each candidate (``"0.01"`` → value);
- ``pairs``: the seed pairs; ``endpoints``: ``{seed: {split: {loss, acc}}}``;
- ``barriers``: ``{variant: {split: {error, loss, error_std, loss_std, error_per_pair, loss_per_pair}}}``
  (fractions; ``error`` is the accuracy barrier; mean and population std over the pairs);
- ``diagnostics``: ``{variant: [per pair: invariances, l2_before, l2_after, output_difference]}``;
- ``symmetry``: ``declared`` or ``traced``, and the model's ``invariances``.

``curves.csv`` rows carry a ``pair`` column (the pair's index). Figures: ``barriers.png`` (accuracy barrier
per variant, bars mean ± std with every pair's point) and ``curves.png`` (accuracy along α, mean ± std).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import matplotlib
import numpy as np

from lmc.core.alignment import ActivationMatching, WeightMatching
from lmc.core.barriers import barriers_from_curves
from lmc.core.interpolation import alpha_grid
from lmc.core.normalization import resolve_reset_bn
from lmc.core.permutation import PermutationSpec
from lmc.core.permutation.trees import ablations
from lmc.core.training import evaluate
from lmc.errors import ConfigError
from lmc.report.plotting import save_figure
from lmc.settings import Min, NonNegativeInt, PositiveInt
from lmc.stages.alignment import aligned_pair, apply_alignment, declared_alignment, symmetry_of
from lmc.stages.curves import interpolation_curves, stored_curves
from lmc.stages.endpoints import Recipe, Seeds, seed_models
from lmc.stages.settings import AlignSettings, RunSettings
from lmc.studies import Context, StudyResult
from lmc.studies.common import check_pairs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["Trees", "plot_table", "table_rows"]

SPLITS = ("train", "test")


class Trees:
    """Soft tree ensembles (Kanoh & Sugiyama 2025): accuracy barriers naive, by permutation, + flips, + orders."""

    name = "trees"

    @dataclass
    class Settings:
        learning_rates: list[Annotated[float, Min(0, strict=True)]]  # candidates, chosen by training accuracy
        samples: PositiveInt  # training rows activation matching compares the models on
        activation_seed: NonNegativeInt  # draws those rows

    def check(self, run: RunSettings, options: Any) -> None:
        check_pairs(run, self.name, one_seed_each=False)
        if not options.learning_rates or len(set(options.learning_rates)) != len(options.learning_rates):
            raise ConfigError(f"study.learning_rates must be distinct positive numbers, e.g. [0.01,0.001,0.0001]; "
                              f"got {options.learning_rates}")
        if run.data.split != "none" or run.spawn.step is not None:
            raise ConfigError("study=trees trains every model on the whole training set from its own init; "
                              "use data.split=none and spawn.step=null")

    def run(self, ctx: Context) -> StudyResult:
        s, o, timings = ctx.settings, ctx.options, ctx.timings
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {split: data.split(split) for split in SPLITS}
        seeds = list(s.seeds)
        with timings("train"):
            lr, fit, probes, stored = self._models(ctx, data, splits)
        entries = {**{f"lr/{r:g}": m for r, m in probes.items()}, **{f"model/{t}": m for t, m in zip(seeds, stored)}}
        hashes = {key: m.hash for key, m in entries.items()}
        reused = {key: m.reused for key, m in entries.items()}
        endpoints = {str(seed): {split: dict(zip(("loss", "acc"), evaluate(m.model, *xy, s.interp.eval_batch_size)))
                                 for split, xy in splits.items()} for seed, m in zip(seeds, stored)}

        symmetry = symmetry_of(stored[0].model, data.x_train[:2])
        declared = not isinstance(symmetry, PermutationSpec)
        rows, diagnostics, per_pair = [], {}, []
        for k in range(len(seeds) // 2):
            a, b = stored[2 * k], stored[2 * k + 1]
            pair_rows = []
            for label, method, options in self._variants(symmetry, o):
                with timings("align"):
                    aligned = None
                    if method != "none" and declared:
                        aligned = declared_alignment(ctx.store, symmetry, method, options, a.model, b.model,
                                                     (a.hash, b.hash), data)
                    elif method != "none":
                        aligned = aligned_pair(ctx.store, AlignSettings(method, None, "none", options), symmetry,
                                               a.model, b.model, (a.hash, b.hash), data)
                if aligned is not None:
                    hashes[f"align/{label}/{k}"], reused[f"align/{label}/{k}"] = aligned.hash, aligned.reused
                    diagnostics.setdefault(label, []).append(aligned.diagnostics)
                with timings("interpolate"):
                    curve_rows, h, was_reused = self._curves(ctx, symmetry, a, b, aligned, label, data, splits)
                hashes[f"curves/{label}/{k}"], reused[f"curves/{label}/{k}"] = h, was_reused
                pair_rows += [{**r, "pair": k} for r in curve_rows]
            per_pair.append(barriers_from_curves(pair_rows))
            rows += pair_rows

        tables = {
            "learning_rate": {"chosen": lr, "train_acc": {f"{r:g}": fit[r][1] for r in o.learning_rates},
                              "train_loss": {f"{r:g}": fit[r][0] for r in o.learning_rates}},
            "pairs": [list(p) for p in zip(seeds[0::2], seeds[1::2])],
            "endpoints": endpoints,
            "barriers": _spread(per_pair),
            "diagnostics": diagnostics,
            "symmetry": {"kind": "declared" if declared else "traced",
                         "invariances": list(symmetry.invariances) if declared else ["perm"]},
        }
        return StudyResult(tables, rows, hashes, reused, {str(seed): m for seed, m in zip(seeds, stored)}, seeds)

    @staticmethod
    def _models(ctx: Context, data, splits):
        """The learning rate whose model from ``seeds[0]`` fits the training split best (accuracy, then
        loss), every candidate's ``(loss, acc)`` and model, and the models of all seeds at that rate."""
        s, o = ctx.settings, ctx.options
        seeds = list(s.seeds)
        triples = [Seeds(*t) for t in zip(seeds, s.data_seeds or seeds, s.aug_seeds or seeds)]
        recipes = {lr: Recipe(s.data, data, s.model, replace(s.train, lr=lr), ctx.device) for lr in o.learning_rates}
        recipes[o.learning_rates[0]].check()
        probes = {lr: seed_models(ctx.store, recipe, triples[:1], tags=[f"{seeds[0]} at lr {lr:g}"],
                                  progress=ctx.progress)[0] for lr, recipe in recipes.items()}
        fit = {lr: evaluate(m.model, *splits["train"], s.interp.eval_batch_size) for lr, m in probes.items()}
        lr = max(o.learning_rates, key=lambda r: (fit[r][1], -fit[r][0]))
        others = seed_models(ctx.store, recipes[lr], triples[1:], tags=[str(t) for t in seeds[1:]],
                             progress=ctx.progress)
        return lr, fit, probes, [probes[lr], *others]

    @staticmethod
    def _curves(ctx: Context, symmetry, a, b, aligned, label: str, data, splits):
        """``(rows, hash, reused)`` of the whole-model curves from A to B aligned (``aligned``; None: naive)."""
        interp = replace(ctx.settings.interp, layerwise=False)
        sd_a = a.model.state_dict()
        sd_b = apply_alignment(symmetry, None if aligned is None else aligned.perm, b.model.state_dict())
        norm = {"reset_bn": resolve_reset_bn(interp.reset_bn, a.model), "repair": bool(interp.repair)}

        def compute():
            return interpolation_curves(interp, a.model, sd_a, sd_b, alpha_grid(interp.num_alphas), splits, label, {},
                                        data.x_train, norm, ctx.progress)

        keys = {"a": a.hash, "b": b.hash, "alignment": None if aligned is None else aligned.hash}
        return stored_curves(ctx.store, interp, label, keys, compute)

    @staticmethod
    def _variants(symmetry, o) -> list[tuple[str, str, dict]]:
        """``(label, align method, its options)`` of every variant the model has."""
        if isinstance(symmetry, PermutationSpec):
            activation = ActivationMatching(num_batches=1, batch_size=o.samples, seed=o.activation_seed)
            return [("naive", "none", {}), ("perm", "weight_matching", asdict(WeightMatching())),
                    ("activation", "activation_matching", asdict(activation))]
        every = {"invariances": list(symmetry.invariances)}
        return [("naive", "none", {}),
                *((label, "weight_matching", {"invariances": list(inv)}) for label, inv in ablations(symmetry).items()),
                ("activation", "activation_matching", {**every, "num_samples": o.samples, "seed": o.activation_seed})]

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        rate = results["learning_rate"]
        accs = [e["test"]["acc"] for e in results["endpoints"].values()]
        lines = [f"experiment {results['experiment']}  pairs {results['pairs']}  learning rate {rate['chosen']:g}  "
                 f"test accuracy {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f}%",
                 "accuracy barrier (percentage points, mean ± std over pairs)",
                 f"  {'variant':<18}" + "".join(f"{split:>18}" for split in SPLITS)]
        for label, per_split in results["barriers"].items():
            cells = "".join(f"{_pp(per_split[split]):>18}" for split in SPLITS if split in per_split)
            lines.append(f"  {label:<18}{cells}")
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        run_dir = Path(run_dir)
        config = results["config"]
        title = (f"{results['experiment']}: {_model_label(config['model'])} on {_data_label(config['data'])}, "
                 f"{len(results['pairs'])} seed pairs")
        return [_plot_barriers(results["barriers"], run_dir / "barriers.png", title),
                _plot_curves(rows, run_dir / "curves.png", title)]


def _spread(per_pair: list[dict]) -> dict:
    """Every pair's barriers → ``{variant: {split: {error, loss, *_std, *_per_pair}}}``."""
    out: dict = {}
    for label, per_split in per_pair[0].items():
        out[label] = {}
        for split in per_split:
            entry = {}
            for metric in ("error", "loss"):
                values = [p[label][split][metric] for p in per_pair]
                entry.update({metric: float(np.mean(values)), f"{metric}_std": float(np.std(values)),
                              f"{metric}_per_pair": values})
            out[label][split] = entry
    return out


def _pp(entry: dict) -> str:
    return f"{100 * entry['error']:.2f} ± {100 * entry['error_std']:.2f}"


def _model_label(model: dict) -> str:
    if model.get("name") == "soft_trees":
        return f"{model.get('kind')} D={model.get('depth')} M={model.get('trees')}"
    if model.get("name") == "mlp":
        return f"MLP {model.get('depth')}×{model.get('width')}"
    return str(model.get("name"))


def _data_label(data: dict) -> str:
    return str(data.get("name")) + (f" {data['id']}" if data.get("id") is not None else "")


def _plot_barriers(barriers: dict, path: Path, title: str) -> Path:
    labels = list(barriers)
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(2 + 1.5 * len(labels), 3.6), sharey=True)
    for ax, split in zip(axes, SPLITS):
        for i, label in enumerate(labels):
            entry = barriers[label][split]
            ax.bar(i, 100 * entry["error"], yerr=100 * entry["error_std"], color=f"C{i}", capsize=4, alpha=0.8)
            points = 100 * np.asarray(entry["error_per_pair"])
            ax.plot(np.full(len(points), i) + np.linspace(-0.15, 0.15, len(points)), points, "k.", ms=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_title(f"{split} accuracy barrier")
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("percentage points (mean ± std, dots: pairs)")
    return save_figure(fig, path, title, dpi=100)


def _plot_curves(rows: list[dict], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(10, 3.8), sharey=True)
    labels = list(dict.fromkeys(r["method"] for r in rows))
    for ax, split in zip(axes, SPLITS):
        for i, label in enumerate(labels):
            by_pair: dict = {}
            for r in rows:
                if r["method"] == label and r["split"] == split and not r["layer"]:
                    by_pair.setdefault(str(r["pair"]), []).append((float(r["alpha"]), 100 * float(r["acc"])))
            curves = np.array([[acc for _, acc in sorted(points)] for points in by_pair.values()])
            alphas = [alpha for alpha, _ in sorted(next(iter(by_pair.values())))]
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(alphas, mean, color=f"C{i}", marker=".", label=label)
            ax.fill_between(alphas, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set_title(f"{split} accuracy along the path")
        ax.set_xlabel("α  (0 = model A, 1 = model B)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean ± std over pairs")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title, dpi=100)


# --------------------------------------------------------------------------- the paper's table, over runs

def table_rows(results: list[dict]) -> list[dict]:
    """One row per finished trees run: ``data``, ``model`` (described), ``pairs`` and, per variant, the
    test accuracy barrier in percentage points (mean, std), sorted by data and model."""
    rows = []
    for r in results:
        config = r["config"]
        test = {label: (100 * v["test"]["error"], 100 * v["test"]["error_std"]) for label, v in r["barriers"].items()}
        rows.append({"data": _data_label(config["data"]), "model": _model_label(config["model"]),
                     "pairs": len(r["pairs"]), "lr": r["learning_rate"]["chosen"],
                     "test_acc": 100 * float(np.mean([e["test"]["acc"] for e in r["endpoints"].values()])), **test})
    return sorted(rows, key=lambda row: (row["data"], _model_rank(row["model"]), row["model"]))


def _model_rank(label: str) -> int:
    """The paper's row order: oblivious, non-oblivious (perfect), decision lists, then the rest (the MLP)."""
    kinds = ("oblivious", "perfect", "decision_list", "modified_decision_list")
    return next((i for i, kind in enumerate(kinds) if label.startswith(kind + " ")), len(kinds))


def plot_table(rows: list[dict], path: str | Path) -> Path:
    """The table as bars: one panel per dataset, one group per model, one bar per variant (mean ± std)."""
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    variants = ["naive", "perm", "perm+flip", "perm+flip+order", "activation"]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, 3.4 * len(datasets)), squeeze=False)
    for ax, name in zip(axes[:, 0], datasets):
        group = [r for r in rows if r["data"] == name]
        width = 0.8 / len(variants)
        for j, variant in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i, r in enumerate(group) if variant in r]
            values = [r[variant] for r in group if variant in r]
            if values:
                ax.bar(xs, [v[0] for v in values], width, yerr=[v[1] for v in values], capsize=2, color=f"C{j}",
                       label=variant)
        ax.set_xticks(range(len(group)), [r["model"].replace(" ", "\n") for r in group], fontsize=8)
        ax.set_ylabel("test accuracy barrier (pp)")
        ax.set_title(name)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8, ncol=len(variants))
    return save_figure(fig, Path(path), "accuracy barrier per model and variant (mean ± std over seed pairs)", dpi=100)
