"""Study ``layerwise``: layer-wise linear mode connectivity in full (Adilova et al., "Layer-wise linear mode
connectivity", ICLR 2024; code ``link-er/layer-wise-lmc``).

    data ─► models A, B (store; checkpoints kept every epoch) ─► [align B to A] ─► layer sets × bases × α
         ─► barriers with the full endpoints as baseline ─► tables, heatmap, cumulative curves, random control

The definitions are :mod:`lmc.core.layerwise`'s: layers are the state-dict entries of one module
(``study.blocks``: regular expressions merge modules into blocks); a layer set S moves from A to B while the
rest stays at A (*into A*) or at B (*into B*); its barrier is ``max_α M(θ_base^S(α)) − [(1 − α)·M(θ_A) +
α·M(θ_B)]`` with the whole endpoints as baseline, and the midpoint variant the paper plots. The sets:

- ``single``: every layer alone;
- ``cumulative``: S grows one layer at a time in each of ``study.orders`` (``shallow`` from the input,
  ``deep`` from the output, ``random`` for each seed of ``study.random_order_seeds``, ``minimal``: the first
  and last ``study.minimal_edge`` layers first);
- ``window``: every run of w consecutive layers, for each w of ``study.windows``;
- ``random_dir``: the control: each layer moved by the averaging path's distance ``‖θ_B^l − θ_A^l‖`` in a
  seeded random direction, ``study.random_samples`` samples.

Over training (``study.epochs``: ``all`` = every epoch, a list, or ``[]``): the single-layer barriers of A's
and B's checkpoints at each epoch (kept as they train; a stored model without them is replayed,
:func:`lmc.stages.endpoints.kept_states`): the paper's layer × epoch heatmap.

Pairs (``study.pair``): ``spawned`` (default, the paper's case): A and B share the init of ``seeds[0]`` and
differ in data order (``data_seeds``, default ``seeds``), spawned from one parent at ``spawn.step`` (null = 0,
the same init; the pair study's ``spawn.step=0`` models, shared through the store); ``independent``: each
from its own seed's init, measured naive and, unless ``align=none``, aligned by ``align.method`` (each kept
epoch's checkpoints aligned on their own).

The α grid is the study's own (``study.alphas``, the paper's {0, ½, 1}); every (set, base, α) is one
evaluation of the train and test splits, batched with ``torch.func.vmap`` where a calibration finds that
faster (``study.batched``). The rows of one method and epoch are stored in the run store (``curves``), keyed
by the models' (and the alignment's) keys and every setting that determines them.

``results.json`` tables:

- ``endpoints``: ``{a, b}`` → split → ``{loss, acc}`` (final models);
- ``layers``: ``[{name, keys}]`` in model order; ``orders``: ``[{order, layers}]`` (each cumulative order);
- ``sets``: ``[{name, kind, layer, layers}]`` (the final models' sets; :func:`layers_of`, :func:`orders_of`,
  :func:`sets_of` and :func:`epochs_of` read these lists back as mappings);
- ``barriers``: the whole-model barriers, method → split → ``{loss, error, loss_midpoint, error_midpoint}``;
- ``layerwise``: one record per curve: ``method, kind, set, layer, base, epoch, split`` and the four barriers
  (``epoch`` empty for the final models; whole-model curves have kind ``whole``);
- ``random_direction``: per method, layer, base, epoch and split: the averaging barriers, the random ones'
  mean and std over samples, both distances (the same by construction);
- ``headline``: method → split → the whole-model loss barrier, the largest single-layer barrier (and its
  layer and base), both at α = ½ and max over α, and the full cumulative set's (the whole model's);
- ``over_training``: ``[{epoch, step}]`` measured; ``diagnostics``, ``normalization``.

``curves.csv``: one long table, :data:`lmc.core.layerwise.LAYERWISE_COLUMNS`. Figures (from those files
alone): ``heatmap.png`` (single-layer midpoint loss barrier, layer × epoch, into A and into B),
``cumulative.png`` (barrier of the first k layers per order, windows beside), ``random_direction.png``
(averaging vs random direction per layer); one set per method, the aligned method's with its name.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np

from lmc.core.layerwise import (
    LAYERWISE_COLUMNS,
    barrier_table,
    cumulative_sets,
    layer_groups,
    layer_order,
    layerwise_rows,
    random_direction_sets,
    random_displacement,
    single_sets,
    window_sets,
)
from lmc.core.normalization import corrections, resolve_reset_bn, stat_batches
from lmc.core.training import evaluate
from lmc.errors import ConfigError
from lmc.io import read_curves, write_curves
from lmc.report.plotting import save_figure
from lmc.settings import NonNegativeInt, PositiveInt, show
from lmc.stages.alignment import aligned_pair, apply_alignment, check_method, symmetry_of
from lmc.stages.endpoints import Recipe, Seeds, StoredModel, check_spawn_step, kept_states, seed_models, spawned_models
from lmc.stages.settings import RunSettings, check_seeds
from lmc.studies import Context, StudyResult

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["Layerwise", "cumulative_curves", "epochs_of", "heatmap_matrix", "layers_of", "orders_of", "plot_cumulative",
           "plot_heatmap", "plot_random_direction", "random_direction_pairs", "sets_of"]

SPLITS = ("train", "test")
METRICS = ("loss", "error", "loss_midpoint", "error_midpoint")
BASE_LABELS = {"a": "into A (rest at A)", "b": "into B (rest at B)"}
FIGURE_SPLIT, FIGURE_METRIC = "train", "loss_midpoint"  # what the figures plot (the paper's heatmaps)


class Layerwise:
    """Layer-wise LMC (Adilova et al. 2024): single layers, cumulative sets, windows, random control, over training."""

    name = "layerwise"

    @dataclass
    class Settings:
        pair: Literal["spawned", "independent"]  # same init, different data order | each its own init
        alphas: list[float]  # the layer-wise α grid (from 0 to 1)
        bases: list[Literal["a", "b"]]  # which model the rest of the network stays at
        blocks: dict[str, str] | list[str] | None  # regular expressions merging modules into blocks (null: none)
        orders: list[Literal["shallow", "deep", "random", "minimal"]]  # cumulative orders
        random_order_seeds: list[NonNegativeInt]  # one random cumulative order per seed
        minimal_edge: NonNegativeInt | None  # layers taken from each end first by `minimal`; null = n // 4
        windows: list[PositiveInt]  # sliding-window widths
        random_samples: NonNegativeInt  # random directions per layer (0: no control)
        random_seed: NonNegativeInt  # seeds the directions
        epochs: Literal["all"] | list[PositiveInt]  # over training: every epoch, these epochs, or none ([])
        batched: Literal["auto"] | bool  # evaluate several networks per vmapped call: auto (measured) | true | false

    def check(self, run: RunSettings, options: Any) -> None:
        o = options
        seeds = check_seeds(run.seeds)
        data_seeds = check_seeds(run.data_seeds, name="data_seeds", distinct=False) \
            if run.data_seeds is not None else seeds
        aug_seeds = check_seeds(run.aug_seeds, name="aug_seeds", distinct=False) \
            if run.aug_seeds is not None else seeds
        alphas = [float(a) for a in o.alphas]
        if len(alphas) < 2 or alphas != sorted(set(alphas)) or alphas[0] != 0.0 or alphas[-1] != 1.0:
            raise ConfigError(f"study.alphas must increase from 0 to 1 (the endpoints give the barrier's baseline), "
                              f"e.g. study.alphas=[0,0.5,1]; got {show(o.alphas)}")
        if not o.bases or len(set(o.bases)) != len(o.bases):
            raise ConfigError(f"study.bases must be distinct bases, a non-empty list of a, b; got {show(o.bases)}")
        if len(set(o.orders)) != len(o.orders):
            raise ConfigError(f"study.orders repeats an order: {show(o.orders)}; valid: shallow, deep, random, minimal")
        if "random" in o.orders and not o.random_order_seeds:
            raise ConfigError("study.orders has random but study.random_order_seeds is empty; give seeds, e.g. "
                              "study.random_order_seeds=[0,1,2]")
        if run.data.split != "none":
            raise ConfigError(f"study=layerwise trains A and B on the whole training set, got "
                              f"data.split={run.data.split}; use data.split=none")
        if o.pair == "spawned":
            if len(set(zip(data_seeds, aug_seeds))) != 2:
                raise ConfigError(f"study.pair=spawned needs different data_seeds or aug_seeds for A and B (they "
                                  f"share the init of seeds[0]), got {data_seeds}, {aug_seeds}")
        elif run.spawn.step is not None:
            raise ConfigError(f"study.pair=independent trains A and B from their own inits, got spawn.step="
                              f"{run.spawn.step}; set spawn.step=null, or study.pair=spawned")
        if o.pair == "independent" and run.align.method != "none":
            check_method(run.align, run.model)
            if run.align.merge != "none":
                raise ConfigError(f"study=layerwise aligns B to A, got align.merge={run.align.merge}; "
                                  "use align.merge=none")
        if run.interp.repair:
            raise ConfigError("study=layerwise corrects only BatchNorm statistics (interp.reset_bn), as the layer-wise "
                              "sweep of the pair study; set interp.repair=false")
        if run.train.stop_loss is not None and o.epochs != []:
            raise ConfigError("study=layerwise keeps a checkpoint at every epoch of study.epochs, which "
                              "train.stop_loss may never reach; set train.stop_loss=null or study.epochs=[]")
        if o.epochs != "all" and len(set(o.epochs)) != len(o.epochs):
            raise ConfigError(f"study.epochs repeats an epoch: {show(o.epochs)}")
        if o.epochs != "all" and o.epochs and max(o.epochs) > run.train.epochs:
            raise ConfigError(f"study.epochs must be epochs in 1..{run.train.epochs} (train.epochs), all, or []; "
                              f"got {show(o.epochs)}")

    # ------------------------------------------------------------------------------------------ layer sets

    @staticmethod
    def layer_sets(groups: Mapping[str, list[str]], o: Any) -> tuple[list, dict]:
        """Every final-model set (single, cumulative per order, windows, random directions) and the orders."""
        names = list(groups)
        for width in o.windows:
            if width > len(names):
                raise ConfigError(f"study.windows has width {width}, larger than the number of layers ({len(names)}: "
                                  f"{', '.join(names)}); valid: 1..{len(names)}")
        singles = single_sets(groups)
        sets, orders = list(singles), {}
        for order in o.orders:
            for seed in (o.random_order_seeds if order == "random" else [0]):
                label = f"random{seed}" if order == "random" else order
                orders[label] = layer_order(names, order, seed, o.minimal_edge)
                sets += cumulative_sets(groups, order, seed, o.minimal_edge)
        for width in o.windows:
            sets += window_sets(groups, width)
        sets += random_direction_sets(singles, o.random_samples, o.random_seed)
        return sets, orders

    # ------------------------------------------------------------------------------------------------ run

    def run(self, ctx: Context) -> StudyResult:
        s, o, timings = ctx.settings, ctx.options, ctx.timings
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {split: (getattr(data, f"x_{split}"), getattr(data, f"y_{split}")) for split in SPLITS}
        steps_per_epoch = math.ceil(len(data.y_train) / s.train.batch_size)
        epochs = list(range(1, s.train.epochs + 1)) if o.epochs == "all" else sorted(o.epochs)
        spawn_step = (s.spawn.step or 0) if o.pair == "spawned" else 0
        if spawn_step:  # A and B exist from the spawn step on: only the epochs that end after it have checkpoints
            before = [e for e in epochs if e * steps_per_epoch <= spawn_step]
            if o.epochs != "all" and before:
                raise ConfigError(f"study.epochs {before} end before the spawn step (spawn.step={spawn_step}, "
                                  f"{steps_per_epoch} steps per epoch): A and B have no checkpoints there; "
                                  f"choose epochs after epoch {spawn_step // steps_per_epoch}")
            epochs = [e for e in epochs if e * steps_per_epoch > spawn_step]
        # checkpoints kept as the models train (bookkeeping, not part of their store identity)
        keep = sorted({*s.train.keep_checkpoints, *epochs}, key=str)
        recipe = Recipe(s.data, data, s.model, replace(s.train, keep_checkpoints=keep), ctx.device)
        recipe.check()
        model = recipe.build()
        groups = layer_groups(model, o.blocks or ())  # a pattern matching no module: ConfigError, before training
        sets, orders = self.layer_sets(groups, o)
        singles = [x for x in sets if x.kind == "single"]

        with timings("train"):
            stored, identities, parent = self._endpoints(ctx, recipe)
        model_a, model_b = stored[0].model, stored[1].model
        hashes = {tag: m.hash for tag, m in zip("ab", stored)}
        reused = {tag: m.reused for tag, m in zip("ab", stored)}
        if parent is not None:
            hashes["parent"], reused["parent"] = parent.hash, parent.reused
        eval_batch = s.interp.eval_batch_size
        endpoints = {tag: {split: dict(zip(("loss", "acc"), evaluate(m, *xy, eval_batch)))
                           for split, xy in splits.items()} for tag, m in zip("ab", (model_a, model_b))}

        spec = None
        methods = ["naive"]
        if o.pair == "independent" and s.align.method != "none":
            methods.append(s.align.method)
            spec = symmetry_of(model_a, data.x_train[:2])
        norm = {"reset_bn": resolve_reset_bn(s.interp.reset_bn, model), "repair": False}
        batches = (stat_batches(data.x_train, s.interp.stat_batches, s.interp.stat_batch_size, s.interp.stat_seed)
                   if norm["reset_bn"] else [])
        identity = {"alphas": [float(a) for a in o.alphas], "bases": list(o.bases), "norm": norm,
                    "stats": {k: getattr(s.interp, k) for k in ("stat_batches", "stat_batch_size", "stat_seed")}
                    if norm["reset_bn"] else None}

        rows, diagnostics, distances = [], {}, {}
        pairs = [(None, model_a.state_dict(), model_b.state_dict(), hashes["a"], hashes["b"])]
        if epochs:
            with timings("checkpoints"):
                kept = [self._kept(ctx, recipe, m, identity_, parent, epochs, steps_per_epoch, tag)
                        for m, identity_, tag in zip(stored, identities, "ab")]
            pairs += [(epoch, kept[0][epoch], kept[1][epoch], f"{hashes['a']}@{epoch}ep", f"{hashes['b']}@{epoch}ep")
                      for epoch in epochs]
        with timings("interpolate"):
            for epoch, sd_a, sd_b_raw, key_a, key_b in pairs:
                which = sets if epoch is None else singles
                set_key = {"blocks": o.blocks, "sets": [(x.name, list(x.keys), x.direction_seed) for x in which]}
                for method in methods:
                    sd_b, perm_hash = sd_b_raw, None
                    if method != "naive":
                        aligned = self._aligned(ctx, spec, model, sd_a, sd_b_raw, (key_a, key_b), data)
                        sd_b, perm_hash = apply_alignment(spec, aligned.perm, sd_b_raw), aligned.hash
                        if epoch is None:
                            diagnostics[method] = aligned.diagnostics
                            hashes["align"], reused["align"] = aligned.hash, aligned.reused
                    correct, suffix = corrections(model, sd_a, sd_b, batches, norm["reset_bn"], repair=False)
                    label = method + suffix

                    def compute(sd_a=sd_a, sd_b=sd_b, which=which, label=label, correct=correct, epoch=epoch):
                        return layerwise_rows(model, sd_a, sd_b, splits, which, label, o.alphas, o.bases, epoch=epoch,
                                              correct=correct, batch_size=eval_batch, batched=o.batched,
                                              progress=ctx.progress)

                    key = {"layerwise": {**identity, **set_key}, "method": label, "a": key_a, "b": key_b,
                           "alignment": perm_hash, "epoch": epoch}
                    part, h, was_reused = ctx.store.cached("curves", key, compute, write_curves, _read_rows)
                    tag = f"curves/{label}" + ("" if epoch is None else f"@{epoch}ep")
                    if epoch is None:
                        hashes[tag], reused[tag] = h, was_reused
                        distances[label] = _distances(model, sd_a, sd_b, [x for x in sets if x.kind == "random_dir"])
                    rows += _normalise(part)

        kinds = {x.name: x.kind for x in sets}
        records = [{"method": r["method"], "kind": "whole" if not r["set"] else kinds.get(r["set"], "single"),
                    **{k: r[k] for k in ("set", "layer", "base", "epoch", "split")}, **{m: r[m] for m in METRICS}}
                   for r in barrier_table(rows)]
        whole = {}
        for r in records:
            if r["kind"] == "whole" and r["epoch"] == "":
                whole.setdefault(r["method"], {})[r["split"]] = {m: r[m] for m in METRICS}
        tables = {
            "endpoints": endpoints,
            "layers": [{"name": name, "keys": list(keys)} for name, keys in groups.items()],
            "orders": [{"order": label, "layers": names} for label, names in orders.items()],
            "sets": [{"name": x.name, "kind": x.kind, "layer": x.layer, "layers": _layers_of(x, groups)} for x in sets],
            "barriers": whole,
            "headline": _headline(records, orders, groups),
            "layerwise": records,
            "random_direction": random_direction_pairs(records, distances),
            "over_training": [{"epoch": e, "step": e * steps_per_epoch} for e in epochs],
            "diagnostics": diagnostics,
            "normalization": norm,
        }
        seeds = list(s.seeds)
        return StudyResult(tables, rows, hashes, reused, dict(zip("ab", stored)), seeds)

    def _endpoints(self, ctx: Context, recipe: Recipe) -> tuple[list[StoredModel], list[dict], StoredModel | None]:
        """A and B (spawned from one parent, or from their own seeds), their store identities, the parent."""
        s, o = ctx.settings, ctx.options
        seeds = list(s.seeds)
        data_seeds = s.data_seeds if s.data_seeds is not None else seeds
        aug_seeds = s.aug_seeds if s.aug_seeds is not None else seeds
        if o.pair == "independent":
            triples = [Seeds(*t) for t in zip(seeds, data_seeds, aug_seeds)]
            stored = seed_models(ctx.store, recipe, triples, None, ["a", "b"], ctx.progress)
            return stored, [recipe.settings(t) for t in triples], None
        step = s.spawn.step or 0
        check_spawn_step(step, len(recipe.dataset.y_train), s.train)
        children = [Seeds(seeds[0], d, a) for d, a in zip(data_seeds, aug_seeds)]
        stored, parent = spawned_models(ctx.store, recipe, Seeds(seeds[0], data_seeds[0], aug_seeds[0]), children,
                                        step, ["a", "b"], ctx.progress)
        identities = [recipe.settings(c, spawn={"step": step, "parent": parent.hash}) for c in children]
        return stored, identities, parent

    @staticmethod
    def _kept(ctx, recipe: Recipe, stored: StoredModel, identity: dict, parent, epochs, steps_per_epoch, tag):
        """``{epoch: state dict}`` of the model's checkpoints (kept as it trained, or replayed)."""
        start = parent.final_state if parent is not None else None
        states = kept_states(ctx.store, stored, identity, recipe.build, recipe.dataset, recipe.train, list(epochs),
                             progress=ctx.progress and f"replay {tag}", start=start)
        return {step // steps_per_epoch: {k: v.to(ctx.device) for k, v in state["model"].items()}
                for step, state in states.items()}

    @staticmethod
    def _aligned(ctx, spec, template, sd_a, sd_b, keys, data):
        """What aligns B's state to A's, from the store (keyed by ``keys``: the models', or their checkpoints')."""
        model_a, model_b = (_loaded(template, sd) for sd in (sd_a, sd_b))
        return aligned_pair(ctx.store, ctx.settings.align, spec, model_a, model_b, keys, data)

    # ----------------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        lines = [f"experiment {results['experiment']}  study layerwise  seeds {results['seeds']}  "
                 f"layers: {', '.join(layers_of(results))}"]
        for tag in ("a", "b"):
            cells = "  ".join(f"{split} loss {v['loss']:.4f} acc {v['acc']:.4f}"
                              for split, v in results["endpoints"][tag].items())
            lines.append(f"  model {tag}: {cells}")
        lines.append("loss barriers of the final models: at α = ½ (the paper's) and max over α")
        for method, per_split in results["headline"].items():
            for split, h in per_split.items():
                full = h["full_cumulative_loss"]
                lines.append(f"  {method:<18} {split:<5} whole {h['whole_loss_midpoint']:.4f} "
                             f"(max {h['whole_loss']:.4f})"
                             f"   largest single layer {h['max_single_loss_midpoint']:.4f} "
                             f"({h['max_single_layer_midpoint']}, into {h['max_single_base_midpoint'].upper()}; max "
                             f"{h['max_single_loss']:.4f})" + ("" if full is None else
                                                               f"   all layers cumulative (max) {full:.4f}"))
        records = [r for r in results["layerwise"]
                   if r["kind"] == "single" and r["epoch"] == "" and r["split"] == "train"]
        if records:
            lines.append("single layers, train loss barrier at α = ½ (into A / into B)")
            for method in dict.fromkeys(r["method"] for r in records):
                cells = []
                for layer in layers_of(results):
                    vals = {r["base"]: r["loss_midpoint"] for r in records
                            if r["method"] == method and r["layer"] == layer}
                    cells.append(f"{layer} {' / '.join(f'{vals[b]:.3f}' for b in ('a', 'b') if b in vals)}")
                lines.append(f"  {method:<18} " + "   ".join(cells))
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        run_dir = Path(run_dir)
        records = results["layerwise"]
        config = results["config"]
        model = config["model"]
        options = " ".join(f"{k}={v}" for k, v in model.items() if k not in ("name", "_target_"))
        study = config["study"]
        title = (f"{results['experiment']}: {model.get('name')} {options} on {config['data'].get('name')}, "
                 f"pair {study.get('pair')}, seeds {results['seeds']}")
        paths = []
        methods = list(dict.fromkeys(r["method"] for r in records))
        for i, method in enumerate(methods):
            suffix = "" if i == 0 else f"_{re.sub(r'[^A-Za-z0-9_.+-]', '_', method)}"
            if epochs_of(results):
                paths.append(plot_heatmap(records, layers_of(results), method, run_dir / f"heatmap{suffix}.png",
                                          f"{title}\n{method}: single-layer barrier over training"))
            if any(r["kind"] in ("cumulative", "window") for r in records):
                paths.append(plot_cumulative(records, orders_of(results), method, run_dir / f"cumulative{suffix}.png",
                                             f"{title}\n{method}: cumulative layer sets"))
            if any(r["kind"] == "random_dir" for r in records):
                paths.append(plot_random_direction(results["random_direction"], layers_of(results), method,
                                                   run_dir / f"random_direction{suffix}.png",
                                                   f"{title}\n{method}: averaging vs random direction"))
        return paths


# --------------------------------------------------------------------------------------------- helpers

def layers_of(results: Mapping) -> dict[str, list[str]]:
    """results.json's ``layers`` as layer → state-dict keys (model order). The tables that describe the run
    are lists of records in the file, so that ``lmc.collect`` does not spread them over columns."""
    return {x["name"]: x["keys"] for x in results["layers"]}


def orders_of(results: Mapping) -> dict[str, list[str]]:
    """Cumulative order label → its layers in order."""
    return {x["order"]: x["layers"] for x in results["orders"]}


def sets_of(results: Mapping) -> dict[str, dict]:
    """Set name → ``{kind, layer, layers}`` (the final models' sets)."""
    return {x["name"]: {k: v for k, v in x.items() if k != "name"} for x in results["sets"]}


def epochs_of(results: Mapping) -> list[int]:
    """The kept epochs measured (the heatmap's columns)."""
    return [x["epoch"] for x in results["over_training"]]


def _read_rows(path: Path) -> list[dict]:
    return read_curves(path)


def _normalise(rows: list[dict]) -> list[dict]:
    """Rows as computed or read back from the store: ``epoch`` an int or ``""``, the text columns strings."""
    out = []
    for r in rows:
        epoch = r.get("epoch", "")
        row = {k: r.get(k, "") for k in LAYERWISE_COLUMNS}
        row["epoch"] = int(epoch) if epoch not in ("", None) else ""
        out.append(row)
    return out


def _loaded(template, state):
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


def _layers_of(layer_set, groups) -> list[str]:
    keys = set(layer_set.keys)
    return [name for name, entries in groups.items() if keys & set(entries)]


def _distances(model, sd_a, sd_b, random_sets) -> dict:
    """Per random-direction set: the averaging distance ‖θ_B^S − θ_A^S‖ and the random displacement's norm
    (over the set's parameters)."""
    params = [name for name, _ in model.named_parameters()]
    out = {}
    for x in random_sets:
        keys = [k for k in x.keys if k in set(params)]
        averaging = math.sqrt(sum(((sd_b[k].double() - sd_a[k].double()) ** 2).sum().item() for k in keys))
        moved = random_displacement(x, sd_a, sd_b, params)
        out[x.name] = {"averaging": averaging,
                       "random": math.sqrt(sum((d.double() ** 2).sum().item() for d in moved.values()))}
    return out


def random_direction_pairs(records: list[dict], distances: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Per (method, layer, base, epoch, split): the averaging direction's barriers beside the random
    directions' mean and sample std over their samples (and, where known, both distances)."""
    singles = {(r["method"], r["set"], r["base"], r["epoch"], r["split"]): r for r in records if r["kind"] == "single"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] == "random_dir":
            groups.setdefault((r["method"], r["layer"], r["base"], r["epoch"], r["split"]), []).append(r)
    out = []
    for (method, layer, base, epoch, split), samples in groups.items():
        averaging = singles.get((method, layer, base, epoch, split))
        entry = {"method": method, "layer": layer, "base": base, "epoch": epoch, "split": split,
                 "samples": len(samples)}
        for m in METRICS:
            values = np.array([r[m] for r in samples])
            entry[f"averaging_{m}"] = averaging[m] if averaging else None
            entry[f"random_{m}"] = float(values.mean())
            entry[f"random_{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        dist = [distances[method][r["set"]] for r in samples] if distances and method in distances else []
        if dist:
            entry["averaging_distance"] = dist[0]["averaging"]
            entry["random_distance"] = float(np.mean([d["random"] for d in dist]))
        out.append(entry)
    return out


def _headline(records: list[dict], orders: Mapping[str, list[str]], groups: Mapping) -> dict:
    out: dict = {}
    final = [r for r in records if r["epoch"] == ""]
    n = len(groups)
    for r in final:
        if r["kind"] != "whole":
            continue
        singles = [x for x in final
                   if x["kind"] == "single" and x["method"] == r["method"] and x["split"] == r["split"]]
        best = max(singles, key=lambda x: x["loss"])
        mid = max(singles, key=lambda x: x["loss_midpoint"])
        full = [x for x in final if x["kind"] == "cumulative" and x["method"] == r["method"]
                and x["split"] == r["split"] and x["set"].endswith(f"_{n}")]
        out.setdefault(r["method"], {})[r["split"]] = {
            "whole_loss": r["loss"], "whole_error": r["error"],
            "whole_loss_midpoint": r["loss_midpoint"], "whole_error_midpoint": r["error_midpoint"],
            "max_single_loss": best["loss"], "max_single_error": max(x["error"] for x in singles),
            "max_single_layer": best["layer"], "max_single_base": best["base"],
            "max_single_loss_midpoint": mid["loss_midpoint"], "max_single_layer_midpoint": mid["layer"],
            "max_single_base_midpoint": mid["base"],
            "full_cumulative_loss": max((x["loss"] for x in full), default=None),
        }
    return out


# ---------------------------------------------------------------------------------------------- figures

def heatmap_matrix(records: list[dict], layers: list[str], method: str, base: str, split: str = FIGURE_SPLIT,
                   metric: str = FIGURE_METRIC) -> tuple[list[str], list[int], np.ndarray]:
    """The heatmap's data: one row per layer, one column per kept epoch (NaN where a value is missing)."""
    sel = [r for r in records if r["kind"] == "single" and r["method"] == method and r["base"] == base
           and r["split"] == split and r["epoch"] != ""]
    epochs = sorted({int(r["epoch"]) for r in sel})
    matrix = np.full((len(layers), len(epochs)), np.nan)
    index = {layer: i for i, layer in enumerate(layers)}
    for r in sel:
        matrix[index[r["layer"]], epochs.index(int(r["epoch"]))] = r[metric]
    return list(layers), epochs, matrix


def cumulative_curves(records: list[dict], orders: Mapping[str, list[str]], method: str, base: str,
                      split: str = FIGURE_SPLIT, metric: str = FIGURE_METRIC) -> dict[str, list[float]]:
    """Order label → the barrier of its first k layers, k = 1 … n (final models)."""
    out = {}
    for label, names in orders.items():
        by_k = {int(r["set"].rsplit("_", 1)[1]): r[metric] for r in records
                if r["kind"] == "cumulative" and r["method"] == method and r["base"] == base and r["split"] == split
                and r["epoch"] == "" and r["set"].startswith(f"cum_{label}_")}
        out[label] = [by_k.get(k, float("nan")) for k in range(1, len(names) + 1)]
    return out


def _bases(records, method) -> list[str]:
    present = {r["base"] for r in records if r["method"] == method and r["base"]}
    return [b for b in ("a", "b") if b in present]


def plot_heatmap(records: list[dict], layers: Mapping | list, method: str, path: Path, title: str = "") -> Path:
    layers = list(layers)
    bases = _bases(records, method)
    fig, axes = plt.subplots(1, len(bases), figsize=(1.2 + 4.6 * len(bases), 0.5 * len(layers) + 2.4), squeeze=False)
    data = {b: heatmap_matrix(records, layers, method, b) for b in bases}
    values = np.concatenate([m.ravel() for _, _, m in data.values()])
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    for ax, base in zip(axes[0], bases):
        names, epochs, matrix = data[base]
        im = ax.imshow(matrix, aspect="auto", cmap="coolwarm", vmin=-vmax, vmax=vmax or 1.0)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        step = max(1, len(epochs) // 10)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]], fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(f"{BASE_LABELS[base]}", fontsize=10)
        if len(epochs) <= 12:
            for i in range(len(names)):
                for j in range(len(epochs)):
                    if np.isfinite(matrix[i, j]):
                        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, label=f"{FIGURE_SPLIT} loss barrier at α = ½")
    return save_figure(fig, path, title)


def plot_cumulative(records: list[dict], orders: Mapping[str, list[str]], method: str, path: Path,
                    title: str = "") -> Path:
    bases = _bases(records, method)
    metrics = (("loss_midpoint", "loss barrier at α = ½"), ("error_midpoint", "error barrier at α = ½ (points)"))
    fig, axes = plt.subplots(len(metrics), len(bases), figsize=(5.2 * len(bases), 7), squeeze=False)
    n = max((len(v) for v in orders.values()), default=0)
    whole = {r["split"]: r for r in records if r["kind"] == "whole" and r["method"] == method and r["epoch"] == ""}
    windows = [r for r in records if r["kind"] == "window" and r["method"] == method and r["epoch"] == ""
               and r["split"] == FIGURE_SPLIT]
    for row, (metric, label) in enumerate(metrics):
        scale = 100 if metric.startswith("error") else 1
        for col, base in enumerate(bases):
            ax = axes[row, col]
            curves = cumulative_curves(records, orders, method, base, metric=metric)
            for i, (order, values) in enumerate(curves.items()):
                ax.plot(range(1, len(values) + 1), scale * np.array(values), marker="o", color=f"C{i}", label=order)
            if FIGURE_SPLIT in whole:
                ax.axhline(scale * whole[FIGURE_SPLIT][metric], color="k", ls="--", lw=1, label="whole model")
            for j, width in enumerate(sorted({int(re.match(r"window(\d+)_", r["set"]).group(1)) for r in windows})):
                sel = [r for r in windows if r["base"] == base and r["set"].startswith(f"window{width}_")]
                ax.plot([], [])  # keep colours apart from the orders'
                ax.scatter([width] * len(sel), [scale * r[metric] for r in sel], marker="x", color=f"C{6 + j}",
                           label=f"windows of {width}" if row == col == 0 else None, zorder=3)
            ax.set_xticks(range(1, n + 1))
            ax.set_xlabel("k: layers interpolated (cumulative order; windows at their width)")
            ax.set_ylabel(f"{FIGURE_SPLIT} {label}")
            ax.set_title(BASE_LABELS[base], fontsize=10)
            ax.axhline(0, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path, title)


def plot_random_direction(entries: list[dict], layers: Mapping | list, method: str, path: Path,
                          title: str = "") -> Path:
    layers = list(layers)
    sel = [e for e in entries if e["method"] == method and e["epoch"] == "" and e["split"] == FIGURE_SPLIT]
    bases = [b for b in ("a", "b") if any(e["base"] == b for e in sel)]
    fig, axes = plt.subplots(1, len(bases), figsize=(1.5 + 0.9 * len(layers) * len(bases), 4.2), squeeze=False)
    x = np.arange(len(layers))
    for ax, base in zip(axes[0], bases):
        by_layer = {e["layer"]: e for e in sel if e["base"] == base}
        avg = [by_layer[layer][f"averaging_{FIGURE_METRIC}"] if layer in by_layer else np.nan for layer in layers]
        rnd = [by_layer[layer][f"random_{FIGURE_METRIC}"] if layer in by_layer else np.nan for layer in layers]
        std = [by_layer[layer][f"random_{FIGURE_METRIC}_std"] if layer in by_layer else 0 for layer in layers]
        samples = max((e["samples"] for e in sel), default=0)
        ax.bar(x - 0.2, avg, 0.4, label="averaging direction (B − A)", color="C0")
        ax.bar(x + 0.2, rnd, 0.4, yerr=std, capsize=3, color="C1",
               label=f"random direction, same distance (mean ± std, n={samples})")
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{FIGURE_SPLIT} loss barrier at α = ½")
        ax.set_title(BASE_LABELS[base], fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path, title)

