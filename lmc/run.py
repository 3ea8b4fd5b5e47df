"""One LMC run: ``python -m lmc.run [overrides]`` (Hydra; ``--help`` lists the config groups).

    config ─► data ─► train seed pair ─► align ─► interpolate over α ─► barriers ─► report

Each stage is a plain function from its own module; this file only wires them together.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmc.alignment import align, align_many, check_merge
from lmc.barriers import barriers_from_curves, layerwise_barriers
from lmc.config import check_choices, check_seeds, resolve_device
from lmc.data import from_options, split_pair
from lmc.diagnostics import alignment_diagnostics
from lmc.errors import ConfigError
from lmc.interpolation import alpha_grid, layerwise_sweep, sweep
from lmc.models import build_model
from lmc.normalization import corrections, resolve_reset_bn, stat_batches
from lmc.permutation import apply_permutation, pairwise_barriers, permutation_spec
from lmc.plotting import plot_run
from lmc.results import summary_table, write_curves, write_results
from lmc.tracking import flatten, tracker
from lmc.training import TrainConfig, evaluate, seeded_init, train_pair

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class Timings(dict):
    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole method for one seed pair; writes the run directory's contract files."""
    merge = cfg.align.get("merge", "none")
    check_choices(cfg.data.name, cfg.model.name, cfg.align.method)
    check_merge(merge, cfg.align.method)
    seeds = check_seeds(cfg.seeds, at_least=merge != "none")
    train_cfg = TrainConfig(**cfg.train)
    alphas = alpha_grid(cfg.interp.num_alphas)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    timings = Timings()

    with timings("data"):
        data = from_options(cfg.data, device)
        train_data = split_pair(data, cfg.data.get("split", "none"), cfg.data.get("split_fraction", 0.2),
                                cfg.data.get("split_seed", 0))  # model A's and B's training data
        train_data = [*train_data, *[data] * (len(seeds) - 2)]  # further models (merging) train on all of it
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}

    with tracker(cfg.logger, run_dir, config, name=f"{cfg.name}/{seeds[0]}-{seeds[1]}") as track:
        with timings("train"):
            models = [seeded_init(lambda: build_model(cfg.model.name, data.input_shape, data.num_classes,
                                                      **_model_kwargs(cfg.model)), seed).to(device) for seed in seeds]
            norm = {"reset_bn": resolve_reset_bn(cfg.interp.reset_bn, models[0]), "repair": bool(cfg.interp.repair)}
            train_pair(models, train_data, train_cfg, seeds, progress=cfg.progress)
        model_a, model_b = models[:2]
        eval_batch = cfg.interp.eval_batch_size
        endpoints = {tag: {split: dict(zip(("loss", "acc"), evaluate(m, *xy, eval_batch)))
                           for split, xy in splits.items()} for tag, m in zip("ab", models)}

        with timings("align"):
            spec = permutation_spec(model_a, data.x_train[:2])
            sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
            candidates, diagnostics, pairwise = {"naive": sd_b}, {}, {}
            if merge == "none":
                perm = align(cfg.align.method, spec, model_a, model_b, data, cfg.align)
            else:  # several models, all aligned into A's frame; barriers between every two of them
                perms = align_many(cfg.align.method, merge, spec, models, data, cfg.align)
                perm = perms[1]
                sds = [m.state_dict() for m in models]
                pairwise = {"naive": pairwise_barriers(model_a, sds, alphas, splits, seeds),
                            cfg.align.method: pairwise_barriers(
                                model_a, [apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)],
                                alphas, splits, seeds)}
            if perm is not None:
                candidates[cfg.align.method] = apply_permutation(spec, perm, sd_b)
                params = [dict(m.named_parameters()) for m in (model_a, model_b)]
                diagnostics[cfg.align.method] = alignment_diagnostics(spec, *params, perm)

        with timings("interpolate"):
            rows = []
            batches = stat_batches(data.x_train, cfg.interp.stat_batches, cfg.interp.stat_batch_size,
                                   cfg.interp.stat_seed) if any(norm.values()) else []
            for method, sd in candidates.items():
                correct, suffix = corrections(model_a, sd_a, sd, batches, **norm)
                rows += sweep(model_a, sd_a, sd, alphas, splits, method + suffix, progress=cfg.progress,
                              correct=correct, batch_size=eval_batch)
                if cfg.interp.layerwise:  # one layer moves: BatchNorm reset only (REPAIR targets whole-model α)
                    correct, suffix = corrections(model_a, sd_a, sd, batches, norm["reset_bn"], repair=False)
                    rows += layerwise_sweep(model_a, sd_a, sd, alphas, splits, method + suffix, spec.layers,
                                            progress=cfg.progress, correct=correct, batch_size=eval_batch)

        results = {
            "experiment": cfg.name,
            "seeds": seeds,
            "config": config,
            "endpoints": endpoints,
            "barriers": barriers_from_curves(rows),
            "layerwise": layerwise_barriers(rows, endpoints) if cfg.interp.layerwise else {},
            "diagnostics": diagnostics,
            **({"pairwise": pairwise} if pairwise else {}),
            "timings": dict(timings),
            "normalization": norm,  # corrections applied to every interpolated network (method label suffix)
        }
        with timings("report"):
            write_curves(run_dir, rows)
            write_results(run_dir, results)
            plots = plot_run(run_dir, results, rows)
            _save_models(run_dir, cfg, models, seeds)
        results["timings"] = dict(timings)
        write_results(run_dir, results)
        track.log_curves(rows)
        track.log_images(plots)
        track.log_summary({**flatten("barrier", results["barriers"]), **flatten("layerwise", results["layerwise"]),
                           **flatten("endpoint", endpoints), **flatten("diagnostics", diagnostics),
                           **flatten("pairwise", pairwise)})
    print(summary_table(results))
    print(f"run directory: {run_dir}")
    return results


def _model_kwargs(model_cfg: DictConfig) -> dict:
    return {k: v for k, v in model_cfg.items() if k != "name"}


def _save_models(run_dir: Path, cfg: DictConfig, models, seeds) -> None:
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for tag, model, seed in zip("ab", models, seeds):
        torch.save({"model": OmegaConf.to_container(cfg.model, resolve=True), "seed": seed,
                    "state_dict": model.state_dict()}, ckpt_dir / f"model_{tag}.pt")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
