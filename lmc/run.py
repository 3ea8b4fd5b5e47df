"""One LMC run: ``python -m lmc.run [overrides]`` (Hydra; ``--help`` lists the config groups).

    config ─► data ─► train seed pair ─► align ─► interpolate over α ─► barriers ─► report

Each stage is a plain function from its own module; this file only wires them together. Trained
models, alignments and curves go through the run store (:mod:`lmc.store`), keyed by the settings that
determine them, so a repeated or resumed run reuses what is already computed.
"""

from __future__ import annotations

import math
import random
import shutil
import string
import sys
import time
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmc.config import check_choices, check_group_choices, check_seeds, resolve_device
from lmc.core.alignment import align, align_many, check_merge
from lmc.core.barriers import barriers_from_curves, layerwise_barriers
from lmc.core.data import Dataset, from_options, split_pair
from lmc.core.diagnostics import alignment_diagnostics
from lmc.core.interpolation import alpha_grid, layerwise_sweep, pairwise_barriers, sweep
from lmc.core.models import build_model
from lmc.core.normalization import check_reset_bn, corrections, resolve_reset_bn, stat_batches
from lmc.core.permutation import apply_permutation, permutation_spec
from lmc.core.training import TrainConfig, TrainingDiverged, concurrently, evaluate
from lmc.errors import ConfigError, StoreError
from lmc.io import atomic_write, write_curves
from lmc.report.plotting import plot_run
from lmc.report.results import summary_table, write_results
from lmc.report.tracking import flatten, tracker
from lmc.stages.store import Store, StoredModel, model_settings

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class Timings(dict):
    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole method for one seed pair (or, with ``align.merge``, several models); writes the run
    directory's contract files."""
    merge = cfg.align.get("merge", "none")
    check_choices(cfg.data.name, cfg.model.name, cfg.align.method)
    check_merge(merge, cfg.align.method)
    check_reset_bn(cfg.interp.reset_bn)
    seeds = check_seeds(cfg.seeds, at_least=merge != "none")
    alphas = alpha_grid(cfg.interp.num_alphas)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    store = Store(cfg.store.root, cfg.store.on_corrupt)
    store.check_writable()
    timings = Timings()

    with timings("data"):
        data = from_options(cfg.data, device)
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    eval_batch = cfg.interp.eval_batch_size

    with tracker(cfg.logger, run_dir, config, name=f"{cfg.name}/{'-'.join(map(str, seeds))}") as track:
        with timings("train"):
            stored = train_endpoints(cfg, store, data, device)
        models = [s.model for s in stored[: len(seeds)]]
        model_a, model_b = models[:2]
        endpoints = {tag: {split: dict(zip(("loss", "acc"), evaluate(m, *xy, eval_batch)))
                           for split, xy in splits.items()} for tag, m in zip("ab", models)}
        tags = [*string.ascii_lowercase[: len(seeds)], "parent"]
        hashes = {tag: s.hash for tag, s in zip(tags, stored)}
        reused = {tag: s.reused for tag, s in zip(tags, stored)}

        with timings("align"):
            spec = permutation_spec(model_a, data.x_train[:2])
            sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
            candidates, diagnostics, pairwise = {"naive": (sd_b, None)}, {}, {}
            params = [dict(m.named_parameters()) for m in (model_a, model_b)]

            def with_diagnostics(perm):
                return perm, alignment_diagnostics(spec, *params, perm)

            if merge != "none":  # several models, all aligned into A's frame; barriers between every two
                perms = align_many(cfg.align.method, merge, spec, models, data, cfg.align)
                sds = [m.state_dict() for m in models]
                aligned = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)]
                pairwise = {name: pairwise_barriers(model_a, group, alphas, splits, seeds, batch_size=eval_batch)
                            for name, group in (("naive", sds), (cfg.align.method, aligned))}
                (perm, diagnostic), perm_hash = with_diagnostics(perms[1]), None
            elif cfg.align.method != "none":  # the permutation and its diagnostics, from the store or computed
                (perm, diagnostic), perm_hash, reused["align"] = store.alignment(
                    {"align": OmegaConf.to_container(cfg.align, resolve=True), "a": hashes["a"], "b": hashes["b"]},
                    lambda: with_diagnostics(align(cfg.align.method, spec, model_a, model_b, data, cfg.align)))
                hashes["align"] = perm_hash
            if cfg.align.method != "none":
                candidates[cfg.align.method] = (apply_permutation(spec, perm, sd_b), perm_hash)
                diagnostics[cfg.align.method] = diagnostic

        with timings("interpolate"):
            norm = {"reset_bn": resolve_reset_bn(cfg.interp.reset_bn, model_a), "repair": bool(cfg.interp.repair)}
            rows = []
            for method, (sd, perm_hash) in candidates.items():
                key = {"interp": OmegaConf.to_container(cfg.interp, resolve=True), "method": method,
                       "a": hashes["a"], "b": hashes["b"], "alignment": perm_hash}
                method_rows, hashes[f"curves/{method}"], reused[f"curves/{method}"] = store.curves(
                    key, partial(interpolation_curves, cfg.interp, model_a, sd_a, sd, alphas, splits, method,
                                 spec.layers, data.x_train, norm, cfg.progress))
                rows += method_rows

        results = {
            "experiment": cfg.name,
            "seeds": seeds,
            "config": config,
            "endpoints": endpoints,
            "barriers": barriers_from_curves(rows),
            "layerwise": layerwise_barriers(rows, endpoints) if cfg.interp.layerwise else {},
            "diagnostics": diagnostics,
            **({"pairwise": pairwise} if pairwise else {}),
            "normalization": norm,  # corrections applied to every interpolated network (method label suffix)
            "timings": dict(timings),
            "store": {"root": str(store.root), "hashes": hashes},
            "reused": reused,
        }
        with timings("report"):
            write_curves(run_dir, rows)
            write_results(run_dir, results)
            plots = plot_run(run_dir, results, rows)
            _link_models(run_dir, stored)
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


def train_endpoints(cfg: DictConfig, store: Store, data: Dataset, device: torch.device) -> list[StoredModel]:
    """Models A and B (C, … when merging; then, with ``spawn.step=k``, their common parent), from the
    store or trained.

    Without spawning, model X has init seed ``seeds[X]``, data-order seed ``data_seeds[X]`` and
    augmentation seed ``aug_seeds[X]`` (both default to ``seeds``), and trains on its part of
    ``data.split`` (:func:`lmc.data.split_pair`; all of the training set by default). With
    ``spawn.step=k`` (Frankle et al.'s instability analysis) one parent (init ``seeds[0]``) trains k
    steps, then every model continues from it with its own data-order/augmentation seeds.
    With ``train.concurrent_pair`` the models train at the same time (one CUDA stream each).
    """
    seeds = check_seeds(cfg.seeds, at_least=cfg.align.get("merge", "none") != "none")
    count = len(seeds)
    data_seeds = seeds if cfg.data_seeds is None else check_seeds(cfg.data_seeds, count, name="data_seeds",
                                                                  distinct=False)
    aug_seeds = seeds if cfg.aug_seeds is None else check_seeds(cfg.aug_seeds, count, name="aug_seeds",
                                                                distinct=False)
    train_cfg = TrainConfig(**cfg.train)
    split = cfg.data.get("split", "none")
    parts = split_pair(data, split, cfg.data.get("split_fraction", 0.2), cfg.data.get("split_seed", 0))
    if split != "none" and count != 2:
        raise ConfigError(f"data.split={split} trains exactly two models, got seeds={seeds}; use data.split=none")
    parts = [*parts, *[data] * (count - 2)]
    common = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "train")}

    def build():
        return build_model(cfg.model.name, data.input_shape, data.num_classes, **_model_kwargs(cfg.model)).to(device)

    def get(i, init, data_seed, aug_seed, spawn=None, **kw):
        tag = "parent" if spawn and "stop_step" in spawn else string.ascii_lowercase[i]
        settings = model_settings(**common, init_seed=init, data_seed=data_seed, aug_seed=aug_seed, spawn=spawn,
                                  data_part=i if split != "none" else None)
        return store.trained_model(settings, build, parts[i], train_cfg,
                                   progress=cfg.progress and f"train {tag} (seed {init})", **kw)

    step = cfg.spawn.step
    if step is None:
        jobs = [partial(get, i, *s) for i, s in enumerate(zip(seeds, data_seeds, aug_seeds))]
        return concurrently(jobs, train_cfg.concurrent_pair, device)
    total = math.ceil(len(parts[0].y_train) / train_cfg.batch_size) * train_cfg.epochs
    if not (isinstance(step, int) and 0 <= step <= total):
        raise ConfigError(f"spawn.step must be an integer step in [0, {total}] (train.epochs × steps per epoch) "
                          f"or null, got {step}")
    if split != "none":
        raise ConfigError(f"spawn.step needs one training set for parent and children, got data.split={split}; "
                          "use data.split=none")
    if len(set(zip(data_seeds, aug_seeds))) != count:
        raise ConfigError(f"spawned children need different data_seeds or aug_seeds, got {data_seeds}, {aug_seeds}")
    parent = get(0, seeds[0], data_seeds[0], aug_seeds[0], spawn={"stop_step": step}, stop_step=step)
    jobs = [partial(get, i, seeds[0], d, a, spawn={"step": step, "parent": parent.hash}, start=parent.final_state)
            for i, (d, a) in enumerate(zip(data_seeds, aug_seeds))]
    return [*concurrently(jobs, train_cfg.concurrent_pair, device), parent]


def interpolation_curves(interp: DictConfig, model_a, sd_a, sd_b, alphas, splits, method, layers, x_train, norm,
                         progress) -> list[dict]:
    """Whole-model (and layer-wise) curves from A to ``sd_b``, each α corrected by BatchNorm reset and/or
    REPAIR (``norm``); the corrections add a suffix to the ``method`` label."""
    batches = stat_batches(x_train, interp.stat_batches, interp.stat_batch_size, interp.stat_seed) \
        if any(norm.values()) else []
    correct, suffix = corrections(model_a, sd_a, sd_b, batches, **norm)
    rows = sweep(model_a, sd_a, sd_b, alphas, splits, method + suffix, progress=progress, correct=correct,
                 batch_size=interp.eval_batch_size)
    if interp.layerwise:  # one layer moves: BatchNorm reset only (REPAIR targets whole-model α)
        correct, suffix = corrections(model_a, sd_a, sd_b, batches, norm["reset_bn"], repair=False)
        rows += layerwise_sweep(model_a, sd_a, sd_b, alphas, splits, method + suffix, layers, progress=progress,
                                correct=correct, batch_size=interp.eval_batch_size)
    return rows


def _model_kwargs(model_cfg: DictConfig) -> dict:
    return {k: v for k, v in model_cfg.items() if k != "name"}


def _link_models(run_dir: Path, stored: list[StoredModel]) -> None:
    """``checkpoints/model_{a,b}.pt`` in the run directory: links to the stored models."""
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for tag, s in zip("ab", stored):
        link = ckpt_dir / f"model_{tag}.pt"
        link.unlink(missing_ok=True)
        try:
            link.symlink_to((s.path / "model.pt").resolve())
        except OSError:
            shutil.copyfile(s.path / "model.pt", link)


FAILED_JOBS: set[str] = set()  # failed jobs of this command's sweep (the sweep goes on without them)


class ReportFailedJobs(Callback):
    """After a sweep, whatever its launcher: the jobs that wrote ``error.txt`` (``hydra.callbacks``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        FAILED_JOBS.update(str(p.parent) for p in Path(config.hydra.sweep.dir).glob("**/error.txt"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    reset_global_state()
    try:
        return run(cfg, run_dir)
    except Exception as exc:
        user_fault = isinstance(exc, (ConfigError, StoreError, TrainingDiverged))
        message = f"error: {exc}" if user_fault else f"error: {type(exc).__name__}: {exc}"
        atomic_write(run_dir / "error.txt", message + ("\n" if user_fault else "\n" + traceback.format_exc()))
        if not multirun and not user_fault:
            raise
        if not user_fault:
            traceback.print_exc()
        print(message, file=sys.stderr)
        if multirun:  # one failed job must not stop the sweep; collect lists it as failed
            FAILED_JOBS.add(str(run_dir))
            return None
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


def reset_global_state() -> None:
    """Every job starts alike, whether it is the first of a process or a later one (basic launcher)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_grad_enabled(True)


def cli(argv: list[str] | None = None) -> None:
    """``python -m lmc.run``: Hydra's main, with unknown config-group choices reported as one line."""
    try:
        check_group_choices(sys.argv[1:] if argv is None else argv, CONF_DIR)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} job(s) failed: {', '.join(sorted(FAILED_JOBS))}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from lmc.run import cli as lmc_cli  # the importable module, where Hydra's callbacks record failed jobs

    lmc_cli()
