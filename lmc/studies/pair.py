"""Study ``pair`` (the default): linear mode connectivity of models trained from different seeds.

    data ─► models A, B (C, …) from the store ─► align B to A ─► curves over α ─► barriers

Git Re-Basin (Ainsworth et al. 2023) and Entezari et al. (2022): train A and B from seeds ``seeds``
(data-order and augmentation seeds ``data_seeds``/``aug_seeds``, default ``seeds``), align B to A by
``align.method``, and measure the loss and error barriers of the linear path, naive and aligned, for the
whole model and one layer at a time (Adilova et al.). Variants, each one setting away:

- ``data.split``: A and B train on disjoint parts of the training set (Git Re-Basin §5.4);
- ``spawn.step=k``: A and B continue from one parent trained k steps (Frankle et al.'s instability analysis);
- three or more seeds with ``align.merge``: every model aligned into the first one's frame, and the
  barrier between every two of them (Ito et al.).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmc.core.barriers import barriers_from_curves, layerwise_barriers
from lmc.core.data import split_pair
from lmc.core.diagnostics import alignment_diagnostics
from lmc.core.interpolation import alpha_grid, pairwise_barriers
from lmc.core.normalization import resolve_reset_bn
from lmc.core.permutation import apply_permutation
from lmc.core.training import evaluate
from lmc.errors import ConfigError
from lmc.report.plotting import plot_run
from lmc.report.results import summary_table
from lmc.stages.alignment import (
    aligned_pair,
    aligned_to_first,
    apply_alignment,
    check_method,
    symmetry_of,
)
from lmc.stages.curves import interpolation_curves, stored_curves
from lmc.stages.endpoints import Recipe, Seeds, check_spawn_step, seed_models, spawned_models
from lmc.stages.settings import RunSettings, check_seeds
from lmc.studies import Context, StudyResult

__all__ = ["Pair"]


class Pair:
    """Two models (or more, with align.merge) from different seeds: loss/error barriers, naive and aligned."""

    name = "pair"

    @dataclass
    class Settings:
        """The pair study has no keys of its own: it reads seeds, data_seeds, aug_seeds, spawn, data.split,
        align and interp."""

    def check(self, run: RunSettings, options: Any) -> None:
        check_method(run.align, run.model)
        merging = run.align.merge != "none"
        seeds = check_seeds(run.seeds, at_least=merging)
        count = len(seeds)
        data_seeds = check_seeds(run.data_seeds, count, name="data_seeds", distinct=False) \
            if run.data_seeds is not None else seeds
        aug_seeds = check_seeds(run.aug_seeds, count, name="aug_seeds", distinct=False) \
            if run.aug_seeds is not None else seeds
        if run.data.split != "none" and count != 2:
            raise ConfigError(f"data.split={run.data.split} trains exactly two models, got seeds={seeds}; "
                              "use data.split=none")
        if run.spawn.step is not None:
            if run.data.split != "none":
                raise ConfigError(f"spawn.step needs one training set for parent and children, got "
                                  f"data.split={run.data.split}; use data.split=none")
            if len(set(zip(data_seeds, aug_seeds))) != count:
                raise ConfigError(f"spawned children need different data_seeds or aug_seeds, got {data_seeds}, "
                                  f"{aug_seeds}")

    # ------------------------------------------------------------------------------------------ run

    def run(self, ctx: Context) -> StudyResult:
        s, timings = ctx.settings, ctx.timings
        seeds = list(s.seeds)
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
        recipe = Recipe(s.data, data, s.model, s.train, ctx.device)
        recipe.check()
        alphas = alpha_grid(s.interp.num_alphas)
        eval_batch = s.interp.eval_batch_size
        tags = list(string.ascii_lowercase[: len(seeds)])

        with timings("train"):
            stored = self._endpoints(ctx, recipe, seeds, tags)
        models = [m.model for m in stored[: len(seeds)]]
        model_a, model_b = models[:2]
        endpoints = {tag: {split: dict(zip(("loss", "acc"), evaluate(m, *xy, eval_batch)))
                           for split, xy in splits.items()} for tag, m in zip("ab", models)}
        hashes = {tag: m.hash for tag, m in zip([*tags, "parent"], stored)}
        reused = {tag: m.reused for tag, m in zip([*tags, "parent"], stored)}

        with timings("align"):
            spec = symmetry_of(model_a, data.x_train[:2])  # traced, or declared by the model (tree ensembles)
            sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
            candidates = {"naive": (sd_b, None)}
            diagnostics, pairwise = {}, {}
            method = s.align.method
            if s.align.merge != "none":  # several models, all aligned into A's frame; barriers between every two
                perms, differences = aligned_to_first(s.align, spec, models, data)
                sds = [m.state_dict() for m in models]
                frames = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)]
                pairwise = {name: pairwise_barriers(model_a, group, alphas, splits, seeds, batch_size=eval_batch)
                            for name, group in (("naive", sds), (method, frames))}
                params = [dict(m.named_parameters()) for m in (model_a, model_b)]
                perm, diagnostic, perm_hash = perms[1], alignment_diagnostics(spec, *params, perms[1]), None
                diagnostic["output_difference"] = differences[1]
            elif method != "none":
                result = aligned_pair(ctx.store, s.align, spec, model_a, model_b, (hashes["a"], hashes["b"]), data)
                perm, diagnostic, perm_hash = result.perm, result.diagnostics, result.hash
                hashes["align"], reused["align"] = result.hash, result.reused
            if method != "none":
                candidates[method] = (apply_alignment(spec, perm, sd_b), perm_hash)
                diagnostics[method] = diagnostic

        with timings("interpolate"):
            norm = {"reset_bn": resolve_reset_bn(s.interp.reset_bn, model_a), "repair": bool(s.interp.repair)}
            rows = []
            for label, (sd, perm_hash) in candidates.items():
                def compute(sd=sd, label=label):
                    return interpolation_curves(s.interp, model_a, sd_a, sd, alphas, splits, label, spec.layers,
                                                data.x_train, norm, ctx.progress)

                curve_rows, hashes[f"curves/{label}"], reused[f"curves/{label}"] = stored_curves(
                    ctx.store, s.interp, label, {"a": hashes["a"], "b": hashes["b"], "alignment": perm_hash},
                    compute)
                rows += curve_rows

        tables = {
            "endpoints": endpoints,
            "barriers": barriers_from_curves(rows),
            "layerwise": layerwise_barriers(rows, endpoints) if s.interp.layerwise else {},
            "diagnostics": diagnostics,
            **({"pairwise": pairwise} if pairwise else {}),
            "normalization": norm,  # corrections applied to every interpolated network (method label suffix)
        }
        return StudyResult(tables, rows, hashes, reused, dict(zip("ab", stored)), seeds)

    @staticmethod
    def _endpoints(ctx: Context, recipe: Recipe, seeds: list[int], tags: list[str]):
        """Models A, B (C, …) and, when spawned, their parent last."""
        s = ctx.settings
        data_seeds = s.data_seeds if s.data_seeds is not None else seeds
        aug_seeds = s.aug_seeds if s.aug_seeds is not None else seeds
        step = s.spawn.step
        if step is None:
            triples = [Seeds(*t) for t in zip(seeds, data_seeds, aug_seeds)]
            parts = None
            if s.data.split != "none":
                parts = list(split_pair(recipe.dataset, s.data.split, s.data.split_fraction, s.data.split_seed))
            return seed_models(ctx.store, recipe, triples, parts, tags, ctx.progress)
        check_spawn_step(step, len(recipe.dataset.y_train), s.train)
        children = [Seeds(seeds[0], d, a) for d, a in zip(data_seeds, aug_seeds)]
        stored, parent = spawned_models(ctx.store, recipe, Seeds(seeds[0], data_seeds[0], aug_seeds[0]), children,
                                        step, tags, ctx.progress)
        return [*stored, parent]

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        return summary_table(results)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        return plot_run(run_dir, results, rows)
