"""Study ``star``: is the set of SGD solutions a star domain? (Sonthalia et al., "Do Deep Neural Network
Solutions Form a Star Domain?", ICLR 2025.)

    data ─► N anchors, M held-out models (store) ─► star model(s) trained against the anchors (store)
         ─► every pair of every type: align the second model to the first ─► α sweep ─► barriers ─► mean ± std

The conjecture: modulo permutations some *star model* is linearly connected to every other solution.
Starlight (:func:`lmc.core.star.train_star`) trains it from its own init against N ordinary trained
*anchors*: each step draws an anchor θ_n and a weight t, and descends the loss of ``(1 − t)·θ + t·θ_n``.
The test is on M *held-out* models the star model never saw: if the star–held-out barrier is below
the barrier between two ordinary solutions, the star model is better connected than a solution picked
at random. Anchors and held-out models are ordinary models of the store (``study.anchors``,
``study.held_out``: each seed is the model's init, data-order and augmentation seed), so the pair study,
later star runs and sweeps share them; a star model's store identity adds the anchors' store keys and
the star settings (``study.stars``: its init, data-order, augmentation and draw seed). It keeps
checkpoints and resumes like any stored model.

Evaluation, as the paper's ``results/find_barriers.py``: for every pair of the types ``study.pair_types``
— ``star_held_out``; ``held_out_held_out`` (the issue's "regular–regular"); ``anchor_held_out`` (what
the paper's code calls "regular"); ``star_anchor`` — the second model is aligned to the first by
``align`` (``weight_matching``, best of ``study.align_restarts`` seeds, or ``none``), the linear path is
swept over ``interp.num_alphas`` values of α with BatchNorm statistics reset at every α (``interp.reset_bn``,
``interp.stat_*``), and the loss and error barriers are read off the curves on the train and test
splits. Alignments and curves are stored per pair. Pair types share models, so their pairs are not
independent draws; the std says how much the pairs differ, not a standard error.

The headline is the ratio of the mean star–held-out train-loss barrier to the mean held-out–held-out one
(below 1: the star model is better connected to unseen solutions than they are to each other); the ratio
to anchor–held-out is reported beside it.

``results.json`` tables:

- ``models``: ``{name: {role, seed, hash, train: {loss, acc}, test: {loss, acc}}}``, names ``star<i>``,
  ``anchor<i>``, ``held_out<i>`` (index in ``study.stars``, ``study.anchors``, ``study.held_out``);
- ``star_training``: ``{star<i>: {seed, epochs, loss}}`` (``loss``: the star objective's last epoch mean);
- ``barriers``: ``{pair_type: {split: {loss, error, loss_midpoint, error_midpoint, *_std, n}}}`` (mean
  and sample std over the type's pairs; error as a fraction);
- ``pairs``: one entry per pair and split: ``pair_type, pair, first, second, split, loss, error,
  loss_midpoint, error_midpoint, first_loss, first_acc, second_loss, second_acc``;
- ``ratios``: ``{regular: {split: {loss, error}}}``: mean star–held-out barrier over the mean ``regular`` one;
- ``headline``: ``split, metric, regular, star_held_out, held_out_held_out, anchor_held_out, ratio,
  ratio_anchor_held_out`` (train loss; entries of pair types not measured are absent);
- ``diagnostics``: ``{pair: {l2_before, l2_after, objective_before, objective_after}}`` of each alignment;
- ``normalization``: the corrections applied at every α.

``curves.csv``: every pair's whole-model curves, with ``pair_type`` and ``pair`` columns. Figures:
``curves.png`` (loss and error along α, mean ± std per pair type) and ``barriers.png`` (box plot of the
barriers per pair type, every pair a point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
from tqdm.auto import tqdm

from lmc.core.diagnostics import alignment_diagnostics
from lmc.core.interpolation import alpha_grid
from lmc.core.normalization import resolve_reset_bn
from lmc.core.permutation import apply_permutation, permutation_spec
from lmc.core.permutation.declared import declares_symmetry
from lmc.core.star import PAIR_TYPES, StarConfig, best_matching, pair_barriers, star_pairs, summarise, train_star
from lmc.core.training import evaluate
from lmc.errors import ConfigError
from lmc.io import load_verified, save_atomic
from lmc.report.plotting import save_figure
from lmc.settings import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, show
from lmc.stages.alignment import CHECK_ROWS, Aligned, aligned_pair, checked_permutation
from lmc.stages.curves import interpolation_curves, stored_curves
from lmc.stages.endpoints import Recipe, Seeds, StoredModel, seed_models, trained_model
from lmc.stages.settings import RunSettings
from lmc.studies import Context, StudyResult

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["Star", "star_identity"]

SPLITS = ("train", "test")
REGULAR = ("held_out_held_out", "anchor_held_out")  # the pair types the star–held-out barrier is compared with
LABELS = {"star_held_out": "star–held-out", "held_out_held_out": "held-out–held-out",
          "anchor_held_out": "anchor–held-out", "star_anchor": "star–anchor"}


class Star:
    """Star domains (Sonthalia et al. 2025): a Starlight star model against anchors, barriers per pair type."""

    name = "star"

    @dataclass
    class Settings:
        anchors: list[NonNegativeInt]  # seeds of the anchor models the star model trains against
        held_out: list[NonNegativeInt]  # seeds of the held-out models (never seen by the star model)
        stars: list[NonNegativeInt]  # seeds of the star models (init, data order, augmentation, draws)
        epochs: PositiveInt | None  # the star model's epochs; null = train.epochs
        t_sampling: Literal["uniform", "beta", "constant"]
        t_constant: float
        mu_star: NonNegativeFloat
        permute_anchors: Literal["off", "weight_matching", "sinkhorn"]
        permute_every: PositiveInt
        permute_max_iter: PositiveInt
        permute_seed: NonNegativeInt
        sinkhorn_steps: PositiveInt
        sinkhorn_lr: PositiveFloat
        bn_stat_batches: PositiveInt | None
        bn_stat_seed: NonNegativeInt
        pair_types: list[Literal["star_held_out", "held_out_held_out", "anchor_held_out", "star_anchor"]]
        align_restarts: PositiveInt

    def check(self, run: RunSettings, options: Any) -> None:
        o = options
        for key in ("anchors", "held_out", "stars"):
            values = getattr(o, key)
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"study.{key} must be a non-empty list of distinct seeds, e.g. "
                                  f"study.{key}=[0,1,2]; got {show(values)}")
        shared = sorted(set(o.anchors) & set(o.held_out))
        if shared:
            raise ConfigError(f"study.held_out repeats anchor seeds {shared}: a held-out model must be one the star "
                              f"model never saw; choose other seeds")
        if not o.pair_types or len(set(o.pair_types)) != len(o.pair_types):
            raise ConfigError(f"study.pair_types must be distinct pair types, a non-empty list of "
                              f"{', '.join(PAIR_TYPES)}; got {show(o.pair_types)}")
        if "held_out_held_out" in o.pair_types and len(o.held_out) < 2:
            raise ConfigError(f"pair type held_out_held_out needs at least two held-out models, got "
                              f"study.held_out={o.held_out}")
        self.star_config(o)  # t_constant's range and the rest
        if run.data_seeds is not None or run.aug_seeds is not None:
            raise ConfigError("study=star seeds each model by one seed (study.anchors, study.held_out, study.stars); "
                              "data_seeds and aug_seeds are not read: set them to null")
        if run.spawn.step is not None or run.data.split != "none":
            raise ConfigError("study=star trains every model on the whole training set from its own init; "
                              "use spawn.step=null and data.split=none")
        if run.align.method not in ("weight_matching", "none") or run.align.target or run.align.merge != "none":
            raise ConfigError(f"study=star aligns each pair by weight matching (align=weight_matching) or not at all "
                              f"(align=none), got align.method={run.align.method}, align.merge={run.align.merge}")
        if run.interp.repair:
            raise ConfigError("study=star resets BatchNorm statistics at every α as the paper does, without REPAIR; "
                              "set interp.repair=false")
        if declares_symmetry(run.model.cls):
            raise ConfigError(f"study=star aligns by weight matching on a traced permutation spec, but model "
                              f"{run.model.name} declares its own symmetry; choose another model")
        if run.train.compile:
            raise ConfigError("study=star cannot compile its star model (its steps run through "
                              "torch.func.functional_call); set train.compile=false")

    @staticmethod
    def star_config(o: Any) -> StarConfig:
        return StarConfig(t_sampling=o.t_sampling, t_constant=o.t_constant, mu_star=o.mu_star,
                          permute_anchors=o.permute_anchors, permute_every=o.permute_every,
                          align_max_iter=o.permute_max_iter, align_seed=o.permute_seed,
                          sinkhorn_steps=o.sinkhorn_steps, sinkhorn_lr=o.sinkhorn_lr,
                          bn_stat_batches=o.bn_stat_batches, bn_stat_seed=o.bn_stat_seed)

    # ------------------------------------------------------------------------------------------ run

    def run(self, ctx: Context) -> StudyResult:
        s, o, timings = ctx.settings, ctx.options, ctx.timings
        with timings("data"):
            data = s.data.load(ctx.device)
        splits = {split: data.split(split) for split in SPLITS}
        recipe = Recipe(s.data, data, s.model, s.train, ctx.device)
        recipe.check()

        with timings("train"):
            anchors = seed_models(ctx.store, recipe, [Seeds(x, x, x) for x in o.anchors],
                                  tags=[f"anchor{i}" for i in range(len(o.anchors))], progress=ctx.progress)
            held_out = seed_models(ctx.store, recipe, [Seeds(x, x, x) for x in o.held_out],
                                   tags=[f"held_out{i}" for i in range(len(o.held_out))], progress=ctx.progress)
            stars = [self._star(ctx, recipe, anchors, seed, i) for i, seed in enumerate(o.stars)]
        roles = {"star": (stars, o.stars), "anchor": (anchors, o.anchors), "held_out": (held_out, o.held_out)}
        stored = {f"{role}{i}": m for role, (ms, _) in roles.items() for i, m in enumerate(ms)}
        models = {f"{role}{i}": {"role": role, "seed": seed, "hash": m.hash,
                                 **{split: dict(zip(("loss", "acc"), evaluate(m.model, *xy, s.interp.eval_batch_size)))
                                    for split, xy in splits.items()}}
                  for role, (ms, seeds) in roles.items() for i, (m, seed) in enumerate(zip(ms, seeds))}
        hashes = {name: m.hash for name, m in stored.items()}
        reused = {name: m.reused for name, m in stored.items()}

        spec = permutation_spec(anchors[0].model, data.x_train[:2]) if s.align.method != "none" else None
        norm = {"reset_bn": resolve_reset_bn(s.interp.reset_bn, anchors[0].model), "repair": False}
        todo = [(t, a, b) for t in o.pair_types for a, b in star_pairs(t, len(stars), len(anchors), len(held_out))]
        rows, pairs, diagnostics = [], [], {}
        for pair_type, first, second in tqdm(todo, desc="star pairs", disable=not ctx.progress, leave=False):
            pair = f"{first}-{second}"
            a, b = stored[first], stored[second]
            with timings("align"):
                aligned = self._aligned(ctx, spec, a, b, data)
            if aligned is not None:
                hashes[f"align/{pair}"], reused[f"align/{pair}"] = aligned.hash, aligned.reused
                diagnostics[pair] = {k: v for k, v in aligned.diagnostics.items() if k != "layers"}
            with timings("interpolate"):
                curve_rows, hashes[f"curves/{pair}"], reused[f"curves/{pair}"] = self._curves(
                    ctx, a, b, spec, aligned, norm, data, splits)
            pairs += pair_barriers(curve_rows, pair_type, first, second, SPLITS)
            rows += [{**r, "pair_type": pair_type, "pair": pair} for r in curve_rows]

        barriers = _barrier_table(pairs)
        tables = {
            "models": models,
            "star_training": {f"star{i}": {"seed": seed, "epochs": len(m.history),
                                           "loss": m.history[-1]["loss"] if m.history else None}
                              for i, (m, seed) in enumerate(zip(stars, o.stars))},
            "barriers": barriers,
            "ratios": _ratios(barriers),
            "headline": _headline(barriers),
            "pairs": [asdict(p) for p in pairs],
            "diagnostics": diagnostics,
            "normalization": norm,
        }
        return StudyResult(tables, rows, hashes, reused, stored, [*o.anchors, *o.held_out, *o.stars])

    def _star(self, ctx: Context, recipe: Recipe, anchors: list[StoredModel], seed: int, index: int) -> StoredModel:
        """The star model of ``seed``, trained by Starlight against ``anchors`` (from the store when stored)."""
        o = ctx.options
        cfg = self.star_config(o)
        star_recipe = replace(recipe, train=replace(recipe.train, epochs=o.epochs or recipe.train.epochs))
        settings = {**star_recipe.settings(Seeds(seed, seed, seed)),
                    "star": {**star_identity(cfg), "draw_seed": seed, "anchors": [a.hash for a in anchors]}}
        anchor_states = [a.model.state_dict() for a in anchors]

        def fit(model, data, train_cfg, data_seed, aug_seed, progress, checkpoints, stop_step=None, start=None):
            return train_star(model, anchor_states, data, train_cfg, cfg, data_seed=data_seed, aug_seed=aug_seed,
                              draw_seed=seed, progress=progress, checkpoints=checkpoints)

        return trained_model(ctx.store, settings, recipe.build, recipe.dataset, star_recipe.train,
                             progress=ctx.progress and f"train star{index} (seed {seed})", fit=fit)

    @staticmethod
    def _aligned(ctx: Context, spec, a: StoredModel, b: StoredModel, data) -> Aligned | None:
        """B's permutation onto A (weight matching, the best of ``study.align_restarts`` seeds), stored;
        with one restart it is the alignment stage's entry, shared with the pair study."""
        s, restarts = ctx.settings, ctx.options.align_restarts
        if s.align.method == "none":
            return None
        if restarts == 1:
            return aligned_pair(ctx.store, s.align, spec, a.model, b.model, (a.hash, b.hash), data)
        params_a, params_b = dict(a.model.named_parameters()), dict(b.model.named_parameters())

        def compute():
            options = s.align.options
            perm = best_matching(spec, params_a, params_b, options["max_iter"], options["seed"], restarts)
            return perm, alignment_diagnostics(spec, params_a, params_b, perm)

        key = {"align": {**s.align.identity(), "restarts": restarts}, "a": a.hash, "b": b.hash}
        (perm, diagnostics), h, reused = ctx.store.cached(
            "alignments", key, compute,
            lambda path, value: save_atomic(path / "perm.pt", dict(zip(("perm", "diagnostics"), value))),
            lambda path: itemgetter("perm", "diagnostics")(load_verified(path / "perm.pt")))
        difference = checked_permutation(spec, perm, b.model, data.x_train[:CHECK_ROWS], s.align.method)
        return Aligned(perm, {**diagnostics, "output_difference": difference}, h, reused)

    @staticmethod
    def _curves(ctx: Context, a: StoredModel, b: StoredModel, spec, aligned: Aligned | None, norm, data, splits):
        """``(rows, hash, reused)``: whole-model curves from A to B (aligned), stored."""
        interp = replace(ctx.settings.interp, layerwise=False)
        label = "naive" if aligned is None else ctx.settings.align.method
        sd_a, sd_b = a.model.state_dict(), b.model.state_dict()
        if aligned is not None:
            sd_b = apply_permutation(spec, aligned.perm, sd_b)

        def compute():
            return interpolation_curves(interp, a.model, sd_a, sd_b, alpha_grid(interp.num_alphas), splits, label, {},
                                        data.x_train, norm)

        keys = {"a": a.hash, "b": b.hash, "alignment": None if aligned is None else aligned.hash}
        return stored_curves(ctx.store, interp, label, keys, compute)

    # ----------------------------------------------------------------------------------- reporting

    def summary(self, results: dict) -> str:
        models = results["models"]
        counts = {role: sum(m["role"] == role for m in models.values()) for role in ("anchor", "held_out", "star")}
        lines = [f"experiment {results['experiment']}  {counts['anchor']} anchors, {counts['held_out']} held-out, "
                 f"{counts['star']} star model(s)",
                 f"  {'models':<20}{'train acc':>18}{'test acc':>18}"]
        for role in ("anchor", "held_out", "star"):
            cells = "".join(f"{_spread([100 * m[split]['acc'] for m in models.values() if m['role'] == role], '%'):>18}"
                            for split in SPLITS)
            lines.append(f"  {role:<20}{cells}")
        lines.append("barriers, mean ± std over pairs (error in percentage points)")
        lines.append(f"  {'pair type':<20}{'n':>3}" + "".join(f"{f'{split} {metric}':>18}"
                                                               for metric in ("loss", "error") for split in SPLITS))
        for pair_type, per_split in results["barriers"].items():
            cells = []
            for metric in ("loss", "error"):
                for split in SPLITS:
                    entry, scale = per_split[split], 100 if metric == "error" else 1
                    cells.append(f"{scale * entry[metric]:.3f} ± {scale * entry[f'{metric}_std']:.3f}")
            lines.append(f"  {pair_type:<20}{per_split['train']['n']:>3}" + "".join(f"{c:>18}" for c in cells))
        headline = results.get("headline", {})
        if "ratio" in headline or "ratio_anchor_held_out" in headline:
            parts = [f"{LABELS['star_held_out']} / {LABELS[r]} = {headline[key]:.3f}"
                     for r, key in (("held_out_held_out", "ratio"), ("anchor_held_out", "ratio_anchor_held_out"))
                     if key in headline]
            lines.append(f"headline ({headline['split']} {headline['metric']} barrier): " + "; ".join(parts))
        return "\n".join(lines)

    def figures(self, run_dir: Path, results: dict, rows: list[dict]) -> list[Path]:
        run_dir = Path(run_dir)
        counts = {role: sum(m["role"] == role for m in results["models"].values())
                  for role in ("anchor", "held_out", "star")}
        config = results["config"]
        model, study = config["model"], config["study"]
        options = " ".join(f"{k}={v}" for k, v in model.items() if k not in ("name", "_target_"))
        star = (f"star: {study.get('epochs') or config['train']['epochs']} epochs, t {study.get('t_sampling')}, "
                f"anchors re-aligned: {study.get('permute_anchors')}")
        title = (f"{results['experiment']}: {model.get('name')} {options} on {config['data'].get('name')}, "
                 f"{counts['anchor']} anchors, {counts['held_out']} held-out, {counts['star']} star\n{star}")
        return [plot_pair_type_curves(rows, run_dir / "curves.png", title),
                plot_pair_type_barriers(results["pairs"], run_dir / "barriers.png", title)]


def star_identity(cfg: StarConfig) -> dict:
    """The star settings that determine the star model (those a setting switches off are left out, so
    that changing them reuses the stored model)."""
    out = asdict(cfg)
    unused = set()
    if cfg.t_sampling != "constant":
        unused.add("t_constant")
    if cfg.permute_anchors == "off":
        unused |= {"permute_every", "align_max_iter", "align_seed", "sinkhorn_steps", "sinkhorn_lr"}
    elif cfg.permute_anchors == "weight_matching":
        unused |= {"sinkhorn_steps", "sinkhorn_lr"}
    else:
        unused.add("align_max_iter")
    if cfg.bn_stat_batches is None:
        unused.add("bn_stat_seed")
    return {k: v for k, v in out.items() if k not in unused}


def _barrier_table(pairs) -> dict:
    table: dict = {}
    for stat in summarise(pairs):
        entry = table.setdefault(stat.pair_type, {}).setdefault(stat.split, {})
        entry.update({stat.metric: stat.mean, f"{stat.metric}_std": stat.std, "n": stat.n})
    return table


def _ratios(barriers: dict) -> dict:
    if "star_held_out" not in barriers:
        return {}
    star = barriers["star_held_out"]
    return {regular: {split: {m: _ratio(star[split][m], barriers[regular][split][m]) for m in ("loss", "error")}
                      for split in SPLITS}
            for regular in REGULAR if regular in barriers}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b != 0 else None


def _headline(barriers: dict, split: str = "train", metric: str = "loss") -> dict:
    out = {"split": split, "metric": metric, "regular": "held_out_held_out"}
    out.update({t: barriers[t][split][metric] for t in ("star_held_out", *REGULAR) if t in barriers})
    if "star_held_out" in out:
        for regular, key in (("held_out_held_out", "ratio"), ("anchor_held_out", "ratio_anchor_held_out")):
            if regular in out:
                out[key] = _ratio(out["star_held_out"], out[regular])
    return out


def _spread(values: list[float], unit: str = "") -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.1f}{unit}"


# ------------------------------------------------------------------------------------------- figures

def _pair_types(items, key: str = "pair_type") -> list[str]:
    present = {r[key] for r in items}
    return [t for t in PAIR_TYPES if t in present]


def plot_pair_type_curves(rows: list[dict], path: Path, title: str = "") -> Path:
    """Loss and error along α (columns: train, test), mean ± std over the pairs of each pair type."""
    fig, axes = plt.subplots(2, len(SPLITS), figsize=(9, 5.8), sharex=True)
    for i, pair_type in enumerate(_pair_types(rows)):
        for col, split in enumerate(SPLITS):
            sel = [r for r in rows if r["pair_type"] == pair_type and r["split"] == split and not r.get("layer")]
            if not sel:
                continue
            alphas = sorted({float(r["alpha"]) for r in sel})
            by_pair: dict = {}
            for r in sel:
                by_pair.setdefault(r["pair"], {})[float(r["alpha"])] = r
            for row, metric in enumerate(("loss", "error")):
                values = np.array([[_metric(curve[a], metric) for a in alphas] for curve in by_pair.values()])
                mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(alphas))
                ax = axes[row, col]
                ax.plot(alphas, mean, color=f"C{i}", marker=".", label=f"{LABELS[pair_type]} (n={len(values)})")
                ax.fill_between(alphas, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    for row, metric in enumerate(("loss", "error")):
        for col, split in enumerate(SPLITS):
            ax = axes[row, col]
            ax.set_title(f"{split} {metric}", fontsize=10)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("α  (0 = first model, 1 = second, aligned)")
    axes[0, 0].legend(fontsize=8)
    return save_figure(fig, path, title)


def plot_pair_type_barriers(pairs: list[dict], path: Path, title: str = "") -> Path:
    """Box plot of the loss and error barriers (train, test) per pair type, every pair a point."""
    types = _pair_types(pairs)
    panels = [(metric, split) for metric in ("loss", "error") for split in SPLITS]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2))
    rng = np.random.default_rng(0)  # horizontal jitter of the points only
    for ax, (metric, split) in zip(axes, panels):
        scale = 100 if metric == "error" else 1
        data = [[scale * p[metric] for p in pairs if p["pair_type"] == t and p["split"] == split] for t in types]
        ax.boxplot(data, widths=0.6, showfliers=False)
        for i, values in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(values)), values, s=12, color=f"C{i}", zorder=3)
        ax.set_xticks(range(1, len(types) + 1), [LABELS[t] for t in types], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{split} {metric} barrier" + (" (points)" if metric == "error" else ""), fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path, title)


def _metric(row: dict, metric: str) -> float:
    return float(row["loss"]) if metric == "loss" else 1.0 - float(row["acc"])
