"""One lmc run: ``python -m lmc.run [study=<name>] [overrides]`` (Hydra; ``--help`` lists groups and studies).

    compose ─► settings (checked once) ─► study.run over the stored stages ─► report

This file composes, validates, dispatches and reports; the method lives in the study
(:mod:`lmc.studies`), the cached units it is made of in :mod:`lmc.stages`.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lmc.config import CONF_DIR, check_group_choices, register_configs, settings_from_config
from lmc.core.training import TrainingDiverged
from lmc.errors import ConfigError, StoreError, WrongSymmetry
from lmc.io import atomic_write, write_curves
from lmc.report.results import link_models, run_results, write_results
from lmc.report.tracking import flatten, tracker
from lmc.stages.settings import resolve_device
from lmc.stages.store import Store
from lmc.studies import Context, load_study

__all__ = ["CONF_DIR", "cli", "main", "run"]

register_configs()


def run(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> dict:
    """The chosen study on the composed config ``cfg``; writes the run directory's contract files and
    returns ``results.json``'s content. ``overrides`` are the command line's (they say which keys the
    user set explicitly)."""
    settings = settings_from_config(cfg, overrides)
    study, options = load_study(settings.study)
    study.check(settings, options)
    device = resolve_device(settings.device)
    store = Store(settings.store.root, settings.store.on_corrupt)
    store.check_writable()
    ctx = Context(settings, options, Path(run_dir), store, device)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{settings.name}/{'-'.join(map(str, settings.seeds))}"
    with tracker(asdict(settings.logger), ctx.run_dir, settings.config, name=name) as track:
        result = study.run(ctx)
        results = run_results(settings.name, study.name, result.seeds, settings.config, result.tables, ctx.timings,
                              store.root, result.hashes, result.reused)
        with ctx.timings("report"):
            write_curves(ctx.run_dir, result.rows)
            write_results(ctx.run_dir, results)
            plots = study.figures(ctx.run_dir, results, result.rows)
            link_models(ctx.run_dir, result.models)
        results["timings"] = dict(ctx.timings)
        write_results(ctx.run_dir, results)
        track.log_curves(result.rows)
        track.log_images(plots)
        track.log_summary(flatten("", {k: v for k, v in result.tables.items() if isinstance(v, dict)}))
    print(study.summary(results))
    print(f"run directory: {ctx.run_dir}")
    return results


FAILED_JOBS: set[str] = set()  # failed jobs of this command's sweep (the sweep goes on without them)


class CheckOutputDir(Callback):
    """Before Hydra creates the run (or sweep) directory: one line and exit status 1 if it cannot be
    written, instead of Hydra's traceback (``hydra.callbacks``)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable_dir(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable_dir(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _check_writable_dir(folder: Path, key: str) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor) or str(p) == ".")
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        print(f"error: cannot create the output folder {folder} ({key}): {problem}; set {key}=<folder> "
              "(or $LMC_OUTPUT_DIR)", file=sys.stderr)
        raise SystemExit(1)


class ReportFailedJobs(Callback):
    """After a sweep, whatever its launcher: the jobs that wrote ``error.txt`` (``hydra.callbacks``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        FAILED_JOBS.update(str(p.parent) for p in Path(config.hydra.sweep.dir).glob("**/error.txt"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    reset_global_state()
    try:
        return run(cfg, run_dir, list(hydra_cfg.overrides.task))
    except Exception as exc:
        user_fault = isinstance(exc, (ConfigError, StoreError, TrainingDiverged, WrongSymmetry))
        message = f"error: {exc}" if user_fault else f"error: {type(exc).__name__}: {exc}"
        with contextlib.suppress(StoreError):  # a full disk may refuse error.txt too; the message still goes out
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
