"""Study ``soup``: merging models that share a basin — model soups, Model Stock, Fisher and RegMean merging, SWA.

    training set ─► validation split held out ─► parent (store) ─► K children fine-tuned from it, each with
    its own recipe (store) ─► merges ─► val / test / shifted-test accuracy and loss; loss plane through
    three models; barriers between two children

Per seed in ``seeds`` (mean ± std over them): a **parent** trains by ``train.*`` (its init, data-order and
augmentation seed the seed) on the training set minus the validation split, or on a pre-training part of
it (``study.pretrain``: some classes, or a differently generated MNIST-1D), for ``train.epochs`` or, with
``spawn.step=k``, k optimiser steps. Each entry of ``study.children`` is a **child**: the parent's weights
fine-tuned with a fresh optimiser by ``train.*`` overridden by the entry's keys (learning rate, weight
decay, epochs, label smoothing, optimiser, …), its data-order seed ``seed`` and ``augment`` (the soups
paper's hyperparameter grid; Wortsman et al. 2022). Every model is in the run store (a child's identity
holds its parent's hash and its own recipe), so a child is trained once. The merges of the K children:

- **uniform soup** (their mean) and **greedy soup** (children by validation accuracy, each kept if the soup's
  validation accuracy does not drop; Wortsman et al. 2022, Algorithm 1) — on the held-out validation split;
- **Model Stock** (Jang et al. 2024) of the parent and the first two children (the paper's setting) and of
  all K, with the per-layer ratio t = k·cosθ / (1 + (k − 1)·cosθ) of the angle between their updates;
- **Fisher merging** (Matena & Raffel 2022) with each child's diagonal Fisher and **RegMean** (Jin et al.
  2023) with each child's input Gram matrices, both over ``study.stat_batches`` training batches, computed
  once per child and stored;
- the children's **logit ensemble** and the **best child** (by validation accuracy) as references;
- **SWA** (Izmailov et al. 2018): the mean of the checkpoints kept along child ``study.swa_child``'s run at
  epochs ``study.swa_epochs`` (replayed once if its stored entry lacks them), BatchNorm statistics recomputed.

Every network of a model with BatchNorm, the trained ones included, has its statistics recomputed on the
same training batches (``interp.stat_*``) before it is evaluated, so a merge, a child and the ensemble's
members are compared alike (and the greedy soup starts from the best child as the table reports it).

With ``study.independent=N``, N models trained from scratch from different initialisations (init and
data-order seed ``seed + 1000·j``; j = 0 is the parent's run when the parent trains on the whole training
set for all its epochs) are merged the same way (no Model Stock: they have no common parent), naively and
after aligning each to the first by ``align.method`` (``align.merge`` for MergeMany): why permutations
matter for merging. The loss on the plane through ``study.plane`` (three of the parent and
the children; Garipov et al.'s construction) is computed for the first seed, with the other children and
the soups projected onto it.

results.json tables:

- ``children``: per child its ``name`` (``c0``, ``c1``, …), ``seed``, ``augment`` and recipe ``overrides``;
- ``merges``: one row per (``group``, ``method``) — group ``fine-tuned``, ``independent (naive)``,
  ``independent (<align.method>)``; ``kind`` ``model`` (a trained model: ``parent``, ``c<i>``, ``i<j>``),
  ``reference`` (best child, ensemble) or ``merge`` — with ``members`` (per seed, the models merged) and
  ``<split>_acc``, ``<split>_loss`` (mean over seeds) and ``<split>_acc_std``, ``<split>_loss_std`` for the
  splits ``val``, ``test`` and ``shifted``; ``merges_per_seed``: the same rows per seed (``seed`` column);
- ``greedy``: per seed, the greedy soup's ``order`` (children by validation accuracy), ``kept`` and ``steps``
  (per child tried: ``child``, ``kept``, ``candidate_val_acc``, and the soup after the step's ``<split>_acc``);
- ``model_stock``: per Model Stock merge, ``ratios`` and ``cosines`` per weight tensor (mean over seeds),
  ``ratios_std``, and ``per_seed``;
- ``barriers``: {group → {split → {loss, error, …}}} along the linear path between the group's first two
  models (mean over seeds), ``barriers_std``;
- ``plane``: the first seed's grid: ``models`` (names), ``coords`` (their plane coordinates), axes ``a``,
  ``b``, ``loss``/``acc`` (rows b, columns a) on ``split``, and ``projections`` {name → [a, b]};
- ``swa``: ``child``, ``epochs``; ``splits``: the size of each evaluation split; ``shift``: its settings.

curves.csv: the linear paths of ``barriers``: ``method`` (the group), ``layer`` (empty), ``split``,
``alpha``, ``loss``, ``acc`` and ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmc.core.barriers import barriers_from_curves  # noqa: E402
from lmc.core.data import Augmentation, Dataset  # noqa: E402
from lmc.core.data.shifted import SHIFTED_TEST_SETS, RandomShift, shifted_test_set  # noqa: E402
from lmc.core.interpolation import alpha_grid  # noqa: E402
from lmc.core.merging import (  # noqa: E402
    average,
    ensemble_evaluate,
    fisher_diagonal,
    fisher_merge,
    gram_matrices,
    greedy_soup,
    model_stock,
    regmean_merge,
    swa,
    uniform_soup,
)
from lmc.core.normalization import has_batchnorm, reset_bn_stats, resolve_reset_bn, stat_batches  # noqa: E402
from lmc.core.permutation import apply_permutation, permutation_spec  # noqa: E402
from lmc.core.plane import plane_basis, plane_grid  # noqa: E402
from lmc.core.training import TrainConfig, evaluate  # noqa: E402
from lmc.errors import ConfigError  # noqa: E402
from lmc.report.plotting import save_figure  # noqa: E402
from lmc.settings import Min, NonNegativeInt, PositiveInt, coerce, parse, show  # noqa: E402
from lmc.stages.alignment import aligned_pair, aligned_to_first  # noqa: E402
from lmc.stages.curves import interpolation_curves, stored_curves  # noqa: E402
from lmc.stages.endpoints import (  # noqa: E402
    NOT_TRAIN_IDENTITY,
    Recipe,
    Seeds,
    StoredModel,
    check_spawn_step,
    kept_states,
    trained_model,
)
from lmc.stages.merging import (  # noqa: E402
    fine_tuned_model,
    finetune_from,
    permutation_digest,
    stored_plane,
    stored_statistics,
)
from lmc.stages.settings import RunSettings, check_seeds  # noqa: E402
from lmc.studies import Context, StudyResult  # noqa: E402

__all__ = ["Soup"]

SPLITS = ("val", "test", "shifted")
INDEPENDENT_STRIDE = 1000  # independent model j of seed s has init and data-order seed s + 1000·j
CHILD_KEYS = ("seed", "augment")  # a child's own keys besides the train.* keys it overrides
MERGE_ORDER = ("uniform soup", "greedy soup", "model stock (2)", "model stock", "fisher", "regmean", "swa")
Fraction = Annotated[float, Min(0)]


@dataclass
class Child:
    """One fine-tuning run: its recipe (``train.*`` with the entry's overrides), data-order seed, augmentation."""

    name: str
    cfg: TrainConfig
    seed: int
    augment: bool | None  # None: the dataset's own (data.augment)
    overrides: dict


def parse_children(train: TrainConfig, entries: Sequence[Mapping]) -> list[Child]:
    """``study.children`` as :class:`Child` records, every key checked (one-line ConfigError)."""
    children, seen = [], {}
    for i, entry in enumerate(entries):
        prefix = f"study.children[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of train.* keys plus seed and augment, got {show(entry)}")
        entry = dict(entry)
        if "seed" not in entry:
            raise ConfigError(f"{prefix}.seed is required (the child's data-order and augmentation seed)")
        seed = coerce(entry.pop("seed"), NonNegativeInt, f"{prefix}.seed")
        augment = coerce(entry.pop("augment"), bool, f"{prefix}.augment") if "augment" in entry else None
        bookkeeping = [k for k in entry if k in NOT_TRAIN_IDENTITY]
        if bookkeeping:
            raise ConfigError(f"{prefix}.{bookkeeping[0]} is not a child's recipe; valid: the other train.* keys, "
                              f"{', '.join(CHILD_KEYS)}")
        base = {k: v for k, v in asdict(train).items() if k != "keep_checkpoints"}
        cfg = parse(TrainConfig, {**base, **entry}, prefix, also=CHILD_KEYS)
        identity = (tuple(sorted(asdict(cfg).items(), key=str)), seed, augment)
        if str(identity) in seen:
            raise ConfigError(f"{prefix} repeats study.children[{seen[str(identity)]}] (same recipe and seed); "
                              "give it another seed or recipe")
        seen[str(identity)] = i
        children.append(Child(f"c{i}", cfg, seed, augment, entry))
    return children


class Soup:
    """Merging children fine-tuned from one parent: soups, Model Stock, Fisher, RegMean, SWA vs ensemble, best child."""

    name = "soup"

    @dataclass
    class Settings:
        children: list[dict]  # fine-tuning runs: train.* overrides, seed (data order, augmentation), augment
        val_size: PositiveInt  # training examples held out as the validation split (greedy soup, best child)
        val_seed: NonNegativeInt  # draws them
        pretrain: Literal["all", "classes", "generated"]  # the parent's training data
        pretrain_classes: list[NonNegativeInt]  # pretrain=classes: the classes the parent sees
        pretrain_shift: dict  # pretrain=generated: the generator settings of the parent's training set
        pretrain_samples: PositiveInt  # pretrain=generated: its size
        pretrain_seed: NonNegativeInt  # pretrain=generated: its generator seed
        independent: NonNegativeInt  # models of different initialisations merged naive and aligned (0: none)
        stat_batches: PositiveInt  # training batches for each model's Fisher and Gram matrices
        stat_batch_size: PositiveInt  # examples per such batch
        stat_seed: NonNegativeInt  # draws them
        fisher_labels: Literal["exact", "sampled", "empirical"]  # the Fisher's labels
        regmean_alpha: Fraction  # RegMean's α (off-diagonal Gram entries scaled by α), in [0, 1]
        greedy_ties: bool  # greedy soup keeps a child whose soup ties the validation accuracy (the paper's ≥)
        swa_child: NonNegativeInt | None  # the child whose run SWA averages (null: no SWA)
        swa_epochs: list[PositiveInt]  # the epochs of that run averaged
        shift: dict | None  # the shifted test set's generator settings (null: no shifted test set)
        shift_samples: PositiveInt  # its size
        shift_seed: NonNegativeInt  # its generator seed
        plane: list[str]  # three models spanning the plane: parent, c<i>
        plane_points: PositiveInt  # grid points per axis
        plane_margin: Fraction  # the grid's margin beyond the models, a fraction of their span

    def check(self, run: RunSettings, options: Any) -> None:
        check_seeds(run.seeds, 1, at_least=True)
        if run.data_seeds is not None or run.aug_seeds is not None:
            raise ConfigError("study soup takes each child's data-order seed from study.children[i].seed; "
                              f"leave data_seeds and aug_seeds null, got {show(run.data_seeds)}, {show(run.aug_seeds)}")
        if run.data.split != "none":
            raise ConfigError(f"study soup trains every model on one training set, got data.split={run.data.split}; "
                              "use data.split=none (a parent on part of it: study.pretrain)")
        children = parse_children(run.train, options.children)
        if len(children) < 2:
            raise ConfigError(f"study.children must list at least 2 fine-tuning runs, got {len(children)}")
        if options.regmean_alpha > 1:
            raise ConfigError(f"study.regmean_alpha must be in [0, 1], got {options.regmean_alpha}")
        if options.independent == 1:
            raise ConfigError("study.independent must be 0 (none) or at least 2 models, got 1")
        if options.swa_child is not None:
            if options.swa_child >= len(children):
                raise ConfigError(f"study.swa_child must index study.children (0..{len(children) - 1}) or be null, "
                                  f"got {options.swa_child}")
            epochs = children[options.swa_child].cfg.epochs
            if not options.swa_epochs or max(options.swa_epochs) > epochs:
                raise ConfigError(f"study.swa_epochs must list epochs 1..{epochs} of child {options.swa_child}'s run, "
                                  f"got {show(options.swa_epochs)}")
        names = ["parent", *(c.name for c in children)]
        if len(options.plane) != 3 or len(set(options.plane)) != 3 or not set(options.plane) <= set(names):
            raise ConfigError(f"study.plane must name three different models of {', '.join(names)}, "
                              f"got {show(options.plane)}")
        if options.plane_points < 2:
            raise ConfigError(f"study.plane_points must be at least 2, got {options.plane_points}")
        generated = [("study.shift", options.shift is not None), ("study.pretrain=generated",
                                                                    options.pretrain == "generated")]
        for key, used in generated:
            if used and run.data.loader not in SHIFTED_TEST_SETS:
                raise ConfigError(f"{key} needs a dataset with a generator ({', '.join(sorted(SHIFTED_TEST_SETS))}), "
                                  f"got data {run.data.loader}; set study.shift=null / study.pretrain=all")
        if options.pretrain == "classes" and (not options.pretrain_classes
                                              or len(set(options.pretrain_classes)) != len(options.pretrain_classes)):
            raise ConfigError(f"study.pretrain_classes must list distinct classes, "
                              f"got {show(options.pretrain_classes)}")

    # ------------------------------------------------------------------------------------------ run

    def run(self, ctx: Context) -> StudyResult:
        s, opts, timings = ctx.settings, ctx.options, ctx.timings
        children = parse_children(s.train, opts.children)
        with timings("data"):
            data = s.data.load(ctx.device)
            train_data, splits, holdout = self._splits(ctx, data)
        recipe = Recipe(s.data, train_data, s.model, s.train, ctx.device)
        recipe.check()
        model = recipe.build()
        bn_batches = (stat_batches(train_data.x_train, s.interp.stat_batches, s.interp.stat_batch_size,
                                   s.interp.stat_seed) if has_batchnorm(model) else None)
        ev = _Evaluator(model, splits, bn_batches, s.interp.eval_batch_size)
        out = {"children": [{"name": c.name, "seed": c.seed, "augment": c.augment, "overrides": c.overrides}
                            for c in children],
               "splits": {name: len(y) for name, (_, y) in splits.items()}, "shift": opts.shift}
        rows, per_seed, greedy, stock, barriers = [], [], [], {}, []
        ledger, linked = _Ledger(), {}

        for seed in s.seeds:
            ledger.prefix = f"{seed}/"
            with timings("train"):
                parent = ledger.model("parent", self._parent(ctx, recipe, data, seed, holdout))
                kids = [ledger.model(c.name, self._child(ctx, recipe, parent, c, seed, holdout)) for c in children]
            if seed == s.seeds[0]:
                linked.update({"parent": parent, **{c.name: k for c, k in zip(children, kids)}})
            parent_sd, sds = parent.model.state_dict(), [k.model.state_dict() for k in kids]
            names = [c.name for c in children]
            with timings("evaluate"):
                group = [_row("fine-tuned", "parent", "model", ["parent"], ev(ev.correct(parent_sd)))]
                group += [_row("fine-tuned", n, "model", [n], ev(ev.correct(sd))) for n, sd in zip(names, sds)]
            with timings("statistics"):
                stats = self._statistics(ctx, ledger, model, train_data, names, kids, sds, [None] * len(sds))
            with timings("merge"):
                merged, soups, gs = self._merges(ctx, ev, "fine-tuned", names, sds, stats, parent_sd, group)
                stock_seed = {}
                for label, members in (("model stock (2)", [0, 1]), ("model stock", list(range(len(sds))))):
                    ms = model_stock(parent_sd, [sds[i] for i in members])
                    merged.append(_row("fine-tuned", label, "merge", ["parent", *(names[i] for i in members)],
                                       ev(ev.correct(ms.state_dict))))
                    soups[label] = ms.state_dict
                    stock_seed[label] = {"ratios": ms.ratios, "cosines": ms.cosines}
                for label, value in stock_seed.items():
                    stock.setdefault(label, []).append({"seed": seed, **value})
            greedy.append({"seed": seed, **gs})
            if opts.swa_child is not None:
                with timings("swa"):
                    merged.append(self._swa(ctx, recipe, ev, children[opts.swa_child], parent, kids[opts.swa_child],
                                            seed, holdout))
            with timings("interpolate"):
                curve_rows = self._curves(ctx, ledger, model, "fine-tuned", kids[:2], sds[:2], None, splits,
                                          train_data)
            if opts.independent:
                with timings("independent"):
                    indep_rows, indep_curves = self._independent(ctx, ledger, recipe, ev, seed, holdout, splits)
                merged += indep_rows
                curve_rows += indep_curves
            if seed == s.seeds[0]:
                with timings("plane"):
                    out["plane"] = self._plane(ctx, ledger, ev, parent, kids, children, soups)
            rows += [{**r, "seed": seed} for r in curve_rows]
            barriers.append(barriers_from_curves(curve_rows))
            per_seed += [{"seed": seed, **r} for r in group + merged]

        out["merges"] = _aggregate_rows(per_seed)
        out["merges_per_seed"] = per_seed
        out["greedy"] = greedy
        out["model_stock"] = {label: _aggregate_stock(entries) for label, entries in stock.items()}
        out["barriers"], out["barriers_std"] = _aggregate(barriers)
        out["swa"] = ({"child": children[opts.swa_child].name, "epochs": list(opts.swa_epochs)}
                      if opts.swa_child is not None else None)
        return StudyResult(out, rows, ledger.hashes, ledger.reused, linked, list(s.seeds))

    # ------------------------------------------------------------------------------------ the parts

    @staticmethod
    def _splits(ctx: Context, data: Dataset) -> tuple[Dataset, dict, dict]:
        """The training set minus the validation split, the evaluation splits, and the holdout's identity."""
        opts = ctx.options
        n = len(data.y_train)
        if opts.val_size >= n:
            raise ConfigError(f"study.val_size must be smaller than the training set ({n} examples), "
                              f"got {opts.val_size}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(opts.val_seed)).to(data.y_train.device)
        val_idx, train_idx = order[: opts.val_size], order[opts.val_size :].sort().values
        train_data = replace(data, x_train=data.x_train[train_idx], y_train=data.y_train[train_idx])
        splits = {"val": (data.x_train[val_idx], data.y_train[val_idx]), "test": (data.x_test, data.y_test)}
        if opts.shift is not None:
            x, y = shifted_test_set(ctx.settings.data.loader, opts.shift, opts.shift_samples, opts.shift_seed,
                                    ctx.device)
            splits["shifted"] = (_normalised(x, ctx.settings.data.mean, ctx.settings.data.std), y)
        return train_data, splits, {"val_size": opts.val_size, "val_seed": opts.val_seed}

    @staticmethod
    def _identity(recipe: Recipe, seeds: Seeds, holdout: dict, spawn: Mapping | None = None, **extra) -> dict:
        """A model's store identity: the recipe's, the validation holdout, and what else determines it."""
        return {**recipe.settings(seeds, spawn), "holdout": holdout, **extra}

    def _parent(self, ctx: Context, recipe: Recipe, data: Dataset, seed: int, holdout: dict) -> StoredModel:
        """The parent: ``train.*`` from the seed on the pre-training data, ``spawn.step`` steps or all epochs."""
        s, opts = ctx.settings, ctx.options
        pretrain, parent_data = {}, recipe.dataset
        if opts.pretrain == "classes":
            bad = [c for c in opts.pretrain_classes if c >= data.num_classes]
            if bad:
                raise ConfigError(f"study.pretrain_classes must be classes 0..{data.num_classes - 1}, got {bad[0]}")
            classes = torch.tensor(opts.pretrain_classes, device=parent_data.y_train.device)
            keep = torch.isin(parent_data.y_train, classes)
            parent_data = replace(parent_data, x_train=parent_data.x_train[keep], y_train=parent_data.y_train[keep])
            pretrain = {"pretrain": {"classes": sorted(opts.pretrain_classes)}}
        elif opts.pretrain == "generated":
            x, y = shifted_test_set(s.data.loader, opts.pretrain_shift, opts.pretrain_samples, opts.pretrain_seed,
                                    ctx.device)
            parent_data = replace(parent_data, x_train=_normalised(x, s.data.mean, s.data.std), y_train=y)
            pretrain = {"pretrain": {"generator": dict(opts.pretrain_shift), "samples": opts.pretrain_samples,
                                     "seed": opts.pretrain_seed}}
        step = s.spawn.step
        if step is not None:
            check_spawn_step(step, len(parent_data.y_train), s.train, whose="the parent's ")
        settings = self._identity(recipe, Seeds(seed, seed, seed), holdout,
                                  None if step is None else {"stop_step": step}, **pretrain)
        return trained_model(ctx.store, settings, recipe.build, parent_data, s.train, stop_step=step,
                             progress=ctx.progress and f"train parent (seed {seed})")

    def _child_recipe(self, recipe: Recipe, parent: StoredModel, child: Child, seed: int, holdout: dict):
        """The child's settings (its identity) and training data (with its augmentation)."""
        data, extra = recipe.dataset, {}
        if child.augment is not None:
            data = replace(data, augment=_augmentation(recipe.data, data) if child.augment else None)
            extra["augment"] = repr(data.augment)
        settings = self._identity(replace(recipe, train=replace(child.cfg, keep_checkpoints=[])),
                                  Seeds(seed, child.seed, child.seed), holdout, parent=parent.hash, **extra)
        return settings, data

    def _child(self, ctx: Context, recipe: Recipe, parent: StoredModel, child: Child, seed: int,
               holdout: dict) -> StoredModel:
        settings, data = self._child_recipe(recipe, parent, child, seed, holdout)
        opts = ctx.options
        cfg = child.cfg
        if opts.swa_child is not None and child.name == f"c{opts.swa_child}":
            cfg = replace(cfg, keep_checkpoints=list(opts.swa_epochs))  # kept as it trains: no replay for SWA
        return fine_tuned_model(ctx.store, settings, recipe.build, parent, data, cfg,
                                progress=ctx.progress and f"fine-tune {child.name} (seed {seed})")

    def _statistics(self, ctx: Context, ledger, model, data: Dataset, names, stored, sds, perms) -> tuple[list, list]:
        """Each model's Fisher diagonal and Gram matrices (of ``sds``: the ``stored`` models, permuted by
        ``perms``), from the store or computed once and stored."""
        opts = ctx.options
        xs, ys = _batches(data, opts.stat_batches, opts.stat_batch_size, opts.stat_seed)
        batches = {"batches": opts.stat_batches, "batch_size": opts.stat_batch_size, "seed": opts.stat_seed,
                   "holdout": {"val_size": opts.val_size, "val_seed": opts.val_seed}}
        fishers, grams = [], []
        for name, entry, sd, perm in zip(names, stored, sds, perms):
            digest = permutation_digest(perm)
            key = {"model": entry.hash, "permutation": digest, **batches}
            tag = name if digest is None else f"{name} aligned"
            fisher = ledger.entry(f"{tag}/fisher", *stored_statistics(
                ctx.store, "fisher", {**key, "labels": opts.fisher_labels},
                lambda sd=sd: fisher_diagonal(model, sd, xs, opts.fisher_labels, targets=ys, seed=opts.stat_seed)))
            gram = ledger.entry(f"{tag}/gram", *stored_statistics(ctx.store, "gram", key,
                                                                  lambda sd=sd: gram_matrices(model, sd, xs)))
            fishers.append(fisher)
            grams.append(gram)
        return fishers, grams

    def _merges(self, ctx: Context, ev, group_name: str, names, sds, stats, parent_sd, singles):
        """Best child and ensemble (references), uniform and greedy soup, Fisher and RegMean merges of ``sds``;
        the merged state dicts; the greedy soup's record."""
        opts = ctx.options
        each = [r for r in singles if r["kind"] == "model" and r["method"] in names]
        best = max(range(len(each)), key=lambda i: (each[i]["val_acc"], -i))
        best_label = "best child" if parent_sd is not None else "best model"
        rows = [_row(group_name, best_label, "reference", [names[best]], {k: v for k, v in each[best].items()
                                                                              if k.endswith(("_acc", "_loss"))}),
                _row(group_name, "ensemble", "reference", list(names), ev.ensemble([ev.correct(sd) for sd in sds]))]
        soups = {"uniform soup": ev.correct(uniform_soup(sds))}
        rows.append(_row(group_name, "uniform soup", "merge", list(names), ev(soups["uniform soup"])))
        x_val, y_val = ev.splits["val"]
        correct = ev.correct if ev.bn_batches is not None else None
        gs = greedy_soup(ev.model, sds, x_val, y_val, correct=correct, accept_ties=opts.greedy_ties,
                         batch_size=ev.batch_size)
        soups["greedy soup"] = gs.state_dict
        rows.append(_row(group_name, "greedy soup", "merge", [names[i] for i in gs.kept], ev(gs.state_dict)))
        steps, members = [], []
        for step in gs.steps:  # the soup after each child tried, on every split
            if step["kept"]:
                members.append(step["child"])
            soup = ev.correct(average([sds[i] for i in members]))
            steps.append({"child": names[step["child"]], "kept": step["kept"],
                          "candidate_val_acc": step["val_acc"], **ev(soup)})
        record = {"order": [names[i] for i in gs.order], "kept": [names[i] for i in gs.kept], "steps": steps}
        fishers, grams = stats
        rows.append(_row(group_name, "fisher", "merge", list(names), ev(ev.correct(fisher_merge(sds, fishers)))))
        rows.append(_row(group_name, "regmean", "merge", list(names),
                         ev(ev.correct(regmean_merge(sds, grams, alpha=opts.regmean_alpha)))))
        return rows, soups, record

    def _swa(self, ctx, recipe, ev, child: Child, parent: StoredModel, stored: StoredModel, seed, holdout) -> dict:
        """SWA: the mean of the child's checkpoints at ``study.swa_epochs`` (BatchNorm statistics recomputed)."""
        opts = ctx.options
        settings, data = self._child_recipe(recipe, parent, child, seed, holdout)
        states = kept_states(ctx.store, stored, settings, recipe.build, data, child.cfg, list(opts.swa_epochs),
                             progress=ctx.progress and f"replay {child.name}",
                             fit=finetune_from(parent.model.state_dict()))
        checkpoints = [{k: v.to(ctx.device) for k, v in state["model"].items()} for state in states.values()]
        merged = swa(checkpoints, ev.model, ev.bn_batches)
        members = [f"{child.name}@ep{e}" for e in sorted(opts.swa_epochs)]
        return _row("fine-tuned", "swa", "merge", members, ev(merged))

    def _curves(self, ctx, ledger, model, label, stored, sds, perm_hash, splits, data) -> list[dict]:
        """Loss and accuracy along the linear path between two models of a group (through the store)."""
        s = ctx.settings
        norm = {"reset_bn": resolve_reset_bn(s.interp.reset_bn, model), "repair": bool(s.interp.repair)}
        interp = replace(s.interp, layerwise=False)
        eval_splits = {"val": ctx.options.val_size, "val_seed": ctx.options.val_seed, "shift": ctx.options.shift,
                       "shift_samples": ctx.options.shift_samples, "shift_seed": ctx.options.shift_seed}

        def compute():
            return interpolation_curves(interp, model, sds[0], sds[1], alpha_grid(interp.num_alphas), splits, label, {},
                                        data.x_train, norm, ctx.progress)

        curve_rows = ledger.entry(f"curves/{label}", *stored_curves(
            ctx.store, interp, label, {"a": stored[0].hash, "b": stored[1].hash, "alignment": perm_hash,
                                       "splits": eval_splits}, compute))
        return [{**r, "method": label} for r in curve_rows]  # without the BatchNorm-reset suffix: the group

    def _independent(self, ctx, ledger, recipe, ev, seed, holdout, splits):
        """Models from scratch of different initialisations, merged naively and aligned to the first."""
        s, opts = ctx.settings, ctx.options
        stored = []
        for j in range(opts.independent):
            init = seed + INDEPENDENT_STRIDE * j
            settings = self._identity(recipe, Seeds(init, init, init), holdout)
            model = trained_model(ctx.store, settings, recipe.build, recipe.dataset, s.train,
                                  progress=ctx.progress and f"train i{j} (seed {init})")
            stored.append(ledger.model(f"i{j}", model))
        names = [f"i{j}" for j in range(len(stored))]
        models = [m.model for m in stored]
        sds = [m.state_dict() for m in models]
        naive = "independent (naive)"
        singles = [_row(naive, n, "model", [n], ev(ev.correct(sd))) for n, sd in zip(names, sds)]
        groups = [(naive, sds, [None] * len(sds), None)]
        if s.align.method != "none":
            spec = permutation_spec(models[0], recipe.dataset.x_train[:2])
            if s.align.merge != "none":
                perms = [None, *aligned_to_first(s.align, spec, models, recipe.dataset)[0][1:]]  # the first: identity
                perm_hash = permutation_digest(perms[1])  # not stored (it depends on every model at once)
            else:
                aligned = [aligned_pair(ctx.store, s.align, spec, models[0], m.model, (stored[0].hash, m.hash),
                                        recipe.dataset) for m in stored[1:]]
                for name, a in zip(names[1:], aligned):
                    ledger.entry(f"align/{name}", None, a.hash, a.reused)
                perms = [None, *(a.perm for a in aligned)]
                perm_hash = aligned[0].hash
            frames = [sd if p is None else apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)]
            label = s.align.method if s.align.merge == "none" else f"{s.align.method}, {s.align.merge}"
            groups.append((f"independent ({label})", frames, perms, perm_hash))
        rows, curves = list(singles), []
        for group_name, group_sds, perms, perm_hash in groups:
            stats = self._statistics(ctx, ledger, ev.model, recipe.dataset, names, stored, group_sds, perms)
            merged, _, _ = self._merges(ctx, ev, group_name, names, group_sds, stats, None,
                                        [{**r, "group": group_name} for r in singles])
            rows += [r for r in merged if r["kind"] == "merge" or group_name == naive]
            curves += self._curves(ctx, ledger, ev.model, group_name, stored[:2], group_sds[:2], perm_hash, splits,
                                   recipe.dataset)
        return rows, curves

    def _plane(self, ctx, ledger, ev, parent, kids, children, soups) -> dict:
        """Loss and accuracy on the test split over the plane through the three models of ``study.plane``."""
        opts = ctx.options
        by_name = {"parent": parent, **{c.name: k for c, k in zip(children, kids)}}
        sds = {name: m.model.state_dict() for name, m in by_name.items()}
        chosen = list(opts.plane)
        key = {"models": [by_name[n].hash for n in chosen], "points": opts.plane_points, "margin": opts.plane_margin,
               "split": "test", "bn": _bn_key(ctx.settings.interp) if ev.bn_batches is not None else None,
               "eval_batch_size": ev.batch_size}

        def compute():
            return plane_grid(ev.model, *(sds[n] for n in chosen), {"test": ev.splits["test"]},
                              num_points=opts.plane_points, margin=opts.plane_margin, bn_batches=ev.bn_batches,
                              batch_size=ev.batch_size, progress=ctx.progress)

        grid = ledger.entry("plane", *stored_plane(ctx.store, key, compute))
        basis = plane_basis(*(sds[n] for n in chosen))
        others = {n: sd for n, sd in sds.items() if n not in chosen}
        others.update({k: v for k, v in soups.items() if k in ("uniform soup", "greedy soup", "model stock")})
        return {"seed": ctx.settings.seeds[0], "models": chosen, "coords": grid.model_coords.tolist(),
                "a": grid.a.tolist(), "b": grid.b.tolist(), "split": "test",
                "loss": grid.loss["test"].tolist(), "acc": grid.acc["test"].tolist(),
                "projections": {n: list(basis.project(sd)) for n, sd in others.items()}}

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        seeds = results["seeds"]
        splits = [s for s in SPLITS if s in results["splits"]]
        lines = [f"experiment {results['experiment']}  seeds {seeds}  (mean ± std over {len(seeds)} seed"
                 f"{'s' * (len(seeds) > 1)}; accuracy, and test loss)",
                 f"  {'group':<28} {'method':<16} " + " ".join(f"{s + ' acc':>15}" for s in splits) + "   test loss"]
        for r in results["merges"]:
            cells = " ".join(f"{_fmt(r[f'{s}_acc'])} ± {_fmt(r[f'{s}_acc_std'])}" for s in splits)
            lines.append(f"  {r['group']:<28} {r['method']:<16} {cells}   {_fmt(r['test_loss'])}")
        for g in results["greedy"]:
            lines.append(f"greedy soup (seed {g['seed']}): order {g['order']}, kept {g['kept']}")
        for group, per_split in results["barriers"].items():
            b = per_split.get("test", {})
            lines.append(f"barrier between the first two of {group}: test loss {_fmt(b.get('loss'))}, "
                         f"error {_fmt(b.get('error'))}")
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        """``merges.png`` (accuracy per merge method), ``greedy.png`` (the greedy soup as children are tried) and
        ``plane.png`` (test loss over the plane through three models), from results.json alone."""
        run_dir = Path(run_dir)
        return [_plot_merges(results, run_dir / "merges.png"), _plot_greedy(results, run_dir / "greedy.png"),
                _plot_plane(results, run_dir / "plane.png")]


# ------------------------------------------------------------------------------------------ helpers

class _Ledger:
    """The store entries a run used, by role (results.json ``store.hashes`` and ``reused``); ``prefix``
    (the seed) starts every role."""

    def __init__(self):
        self.hashes, self.reused, self.prefix = {}, {}, ""

    def entry(self, role: str, value, entry_hash: str | None, reused: bool):
        """Record ``(value, hash, reused)`` as a stage returns it; returns the value."""
        self.hashes[self.prefix + role], self.reused[self.prefix + role] = entry_hash, reused
        return value

    def model(self, role: str, stored: StoredModel) -> StoredModel:
        return self.entry(role, stored, stored.hash, stored.reused)


class _Evaluator:
    """Loss and accuracy of state dicts of one architecture on every evaluation split."""

    def __init__(self, model, splits: Mapping, bn_batches, batch_size: int):
        self.model, self.splits, self.bn_batches, self.batch_size = model, dict(splits), bn_batches, batch_size

    def correct(self, sd: Mapping) -> dict:
        """A merged network's BatchNorm statistics recomputed on training batches (a no-op without BatchNorm)."""
        return dict(sd) if self.bn_batches is None else reset_bn_stats(self.model, sd, self.bn_batches)

    def __call__(self, sd: Mapping) -> dict:
        out = {}
        for split, (x, y) in self.splits.items():
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(self.model, x, y, self.batch_size, params=dict(sd))
        return out

    def ensemble(self, sds: Sequence[Mapping]) -> dict:
        out = {}
        for split, (x, y) in self.splits.items():
            out[f"{split}_loss"], out[f"{split}_acc"] = ensemble_evaluate(self.model, sds, x, y, self.batch_size)
        return out


def _bn_key(interp) -> dict:
    """What determines the batches BatchNorm statistics are recomputed on."""
    return {"batches": interp.stat_batches, "batch_size": interp.stat_batch_size, "seed": interp.stat_seed}


def _row(group: str, method: str, kind: str, members: list, metrics: Mapping) -> dict:
    return {"group": group, "method": method, "kind": kind, "members": list(members), **metrics}


def _augmentation(data_settings, data: Dataset):
    """A child's ``augment: true``: the dataset's augmentation (images: random crop and flip, as
    ``data.augment``), or for sequences a random cyclic shift of up to ``data.crop_padding`` positions."""
    if len(data.input_shape) == 3:
        return Augmentation(data_settings.crop_padding, data_settings.flip)
    return RandomShift(data_settings.crop_padding)


def _normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``x`` normalised as the dataset's own inputs are (``data.mean``/``data.std``)."""
    if mean is None and std is None:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean if mean is not None else [0.0], dtype=x.dtype, device=x.device).view(shape)
    sd = torch.as_tensor(std if std is not None else [1.0], dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / sd


def _batches(data: Dataset, num_batches: int, batch_size: int, seed: int) -> tuple[list, list]:
    """Training batches and their labels, drawn without repetition (as :func:`lmc.core.normalization.stat_batches`)."""
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed)).to(data.y_train.device)
    order = order[: num_batches * batch_size]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [data.x_train[c] for c in chunks], [data.y_train[c] for c in chunks]


def _aggregate(tables: Sequence) -> tuple:
    """Mean and std (population, over the seeds) of nested dicts with numbers at the leaves."""
    first = tables[0]
    if isinstance(first, Mapping):
        pairs = {k: _aggregate([t[k] for t in tables if k in t]) for k in first}
        return {k: m for k, (m, _) in pairs.items()}, {k: sd for k, (_, sd) in pairs.items()}
    values = np.array([math.nan if v is None else float(v) for v in tables])
    return float(values.mean()), float(values.std())


def _aggregate_rows(per_seed: list[dict]) -> list[dict]:
    """One row per (group, method): members per seed, mean and std of every metric over the seeds."""
    out = {}
    for r in per_seed:
        out.setdefault((r["group"], r["method"]), []).append(r)
    rows = []
    for (group, method), entries in out.items():
        row = {"group": group, "method": method, "kind": entries[0]["kind"],
               "members": [e["members"] for e in entries]}
        for metric in [k for k in entries[0] if k.endswith(("_acc", "_loss"))]:
            values = np.array([e[metric] for e in entries], dtype=float)
            row[metric], row[f"{metric}_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def _aggregate_stock(entries: list[dict]) -> dict:
    ratios, ratios_std = _aggregate([e["ratios"] for e in entries])
    cosines, _ = _aggregate([e["cosines"] for e in entries])
    return {"ratios": ratios, "ratios_std": ratios_std, "cosines": cosines, "per_seed": entries}


def _fmt(x) -> str:
    return "  nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _plot_merges(results: Mapping, path: Path) -> Path:
    """Accuracy per merge method (bars: mean over seeds, error bars: std, dots: each seed), the best child and
    the ensemble as lines; one panel per split, and one for the independently initialised models."""
    splits = [s for s in ("test", "shifted") if s in results["splits"]]
    per_seed = results["merges_per_seed"]
    merges = results["merges"]
    independent = [g for g in dict.fromkeys(r["group"] for r in merges) if g.startswith("independent")]
    panels = [("fine-tuned", split) for split in splits] + ([("independent", "test")] if independent else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (family, split) in zip(axes[0], panels):
        groups = ["fine-tuned"] if family == "fine-tuned" else independent
        bars = [r for r in merges if r["group"] in groups and r["kind"] == "merge"]
        bars.sort(key=lambda r: (groups.index(r["group"]), MERGE_ORDER.index(r["method"])
                                 if r["method"] in MERGE_ORDER else len(MERGE_ORDER)))
        x = np.arange(len(bars))
        colours = [f"C{groups.index(r['group'])}" for r in bars]
        ax.bar(x, [r[f"{split}_acc"] for r in bars], yerr=[r[f"{split}_acc_std"] for r in bars], color=colours,
               alpha=0.75, capsize=3)
        for i, r in enumerate(bars):
            values = [p[f"{split}_acc"] for p in per_seed if p["group"] == r["group"] and p["method"] == r["method"]]
            ax.plot([i] * len(values), values, "k.", ms=4)
        labels = [r["method"] if family == "fine-tuned" else f"{r['method']}\n{r['group'][12:]}" for r in bars]
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        best = "best child" if family == "fine-tuned" else "best model"
        references = [(groups[0], best, "-", "C3"), (groups[0], "ensemble", "--", "C2")]
        if family == "fine-tuned":
            references.append(("fine-tuned", "parent", ":", "C7"))
        for group, method, style, colour in references:
            ref = next((r for r in merges if r["group"] == group and r["method"] == method), None)
            if ref is not None:
                ax.axhline(ref[f"{split}_acc"], ls=style, color=colour, label=f"{method} {ref[f'{split}_acc']:.3f}")
        values = [r[f"{split}_acc"] for r in bars] + [r[f"{split}_acc"] for r in merges if r["group"] in groups]
        low = min(values)
        ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(values) + 0.05))
        ax.set_ylabel(f"{split} accuracy")
        title = "children fine-tuned from one parent" if family == "fine-tuned" else \
            "independent inits: naive vs aligned"
        ax.set_title(f"{title} ({split})", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower right")
    n = len(results["seeds"])
    fig.suptitle(f"{results['experiment']}: merges (mean ± std over {n} seed{'s' * (n > 1)})", fontsize=10)
    return save_figure(fig, path, dpi=100)


def _plot_greedy(results: Mapping, path: Path) -> Path:
    """The greedy soup as children are tried in order of validation accuracy: the soup's validation and test
    accuracy after each step (each seed thin, the mean thick), and each candidate's validation accuracy
    (the soup with the child tried: filled when kept, open when rejected)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    records = results["greedy"]
    for split, colour in (("val", "C0"), ("test", "C1")):
        curves = []
        for g in records:
            values = np.array([step[f"{split}_acc"] for step in g["steps"]])
            curves.append(values)
            ax.plot(np.arange(1, len(values) + 1), values, color=colour, lw=0.8, alpha=0.45)
        mean = np.mean(np.array(curves), axis=0)
        ax.plot(np.arange(1, len(mean) + 1), mean, color=colour, lw=2.2, label=f"soup after the step, {split} (mean)")
    for g in records:
        for k, step in enumerate(g["steps"], start=1):
            ax.plot(k, step["candidate_val_acc"], "o", color="C0", ms=5, alpha=0.8,
                    mfc="C0" if step["kept"] else "none")
    ax.plot([], [], "o", color="C0", label="candidate (val): kept")
    ax.plot([], [], "o", color="C0", mfc="none", label="candidate (val): rejected")
    ax.set_xlabel("children tried (in order of validation accuracy)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(np.arange(1, len(records[0]["steps"]) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    n = len(records)
    ax.set_title(f"{results['experiment']}: greedy soup ({n} seed{'s' * (n > 1)})", fontsize=10)
    return save_figure(fig, path, dpi=100)


def _plot_plane(results: Mapping, path: Path) -> Path:
    """Test loss over the plane through three models (contours), the models and the projections of the other
    children and the soups marked."""
    plane = results["plane"]
    a, b, loss = np.array(plane["a"]), np.array(plane["b"]), np.array(plane["loss"])
    fig, ax = plt.subplots(figsize=(6, 5))
    levels = np.quantile(loss, np.linspace(0, 1, 15))
    levels = np.unique(levels)
    contour = ax.contourf(a, b, loss, levels=levels if len(levels) > 1 else 10, cmap="viridis_r")
    fig.colorbar(contour, ax=ax, label=f"{plane['split']} loss")
    ax.contour(a, b, loss, levels=levels if len(levels) > 1 else 10, colors="k", linewidths=0.3, alpha=0.5)
    for name, (x, y) in zip(plane["models"], plane["coords"]):
        ax.plot(x, y, "o", color="white", mec="k", ms=8)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8, "lw": 0})
    for i, (name, (x, y)) in enumerate(plane["projections"].items()):
        marker = "*" if " " in name else "^"
        ax.plot(x, y, marker, color=f"C{i % 10}", mec="k", ms=10 if marker == "*" else 6, label=f"{name} (projected)")
    ax.set_xlabel("a (along the second model − the first)")
    ax.set_ylabel("b (orthogonal, in the plane of the third)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{results['experiment']}: {plane['split']} loss on the plane (seed {plane['seed']})", fontsize=10)
    return save_figure(fig, path, dpi=100)
