"""Studies: one module per study, each a short class over the stages, registered by name.

``python -m lmc.run study=<name>`` picks one (``conf/study/<name>.yaml`` holds its own settings; an
experiment file can pick its study too). A study class has

- ``name`` and a docstring whose first line says what it measures (``python -m lmc.run --help``);
- ``Settings``: a dataclass of its own keys (``study.<key>``), checked like every other setting;
- ``check(run, options)``: every cross-setting rule, before anything is loaded, trained or written;
- ``run(ctx) -> StudyResult``: the method, over the store-cached stages (:mod:`lmc.stages`);
- ``summary(results) -> str``: the terminal table; ``figures(run_dir, results, rows) -> [paths]``: its
  figures, from the run directory's files alone (``python -m lmc.figures`` calls it offline).

A user's own study is a class of that shape named by ``study._target_``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lmc.errors import ConfigError
from lmc.settings import locate, parse, show
from lmc.stages.endpoints import StoredModel
from lmc.stages.settings import RunSettings
from lmc.stages.store import Store

__all__ = ["STUDIES", "Context", "Study", "StudyResult", "Timings", "load_study", "study_names"]

STUDIES = {  # study=<name> -> import path of its class (imported when chosen)
    "layerwise": "lmc.studies.layerwise.Layerwise",
    "pair": "lmc.studies.pair.Pair",
    "soup": "lmc.studies.soup.Soup",
    "star": "lmc.studies.star.Star",
    "trees": "lmc.studies.trees.Trees",
    "over_training": "lmc.studies.over_training.OverTraining",
    "dropout_stability": "lmc.studies.dropout_stability.DropoutStability",
    "permutation_invariance": "lmc.studies.permutation_invariance.PermutationInvariance",
}


class Timings(dict):
    """Seconds per stage: ``with timings("train"): ...`` adds the block's wall time to ``timings["train"]``."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class Context:
    """What a study runs with: its checked settings, where it writes, and the shared machinery."""

    settings: RunSettings
    options: Any  # the study's own settings (an instance of its Settings)
    run_dir: Path
    store: Store
    device: torch.device
    timings: Timings = field(default_factory=Timings)

    @property
    def progress(self) -> bool:
        return self.settings.progress


@dataclass
class StudyResult:
    """A study's answer: its tables (results.json keys, in order), the long curves table, and the store
    entries it used."""

    tables: dict[str, Any]  # the study's own results.json keys
    rows: list[dict]  # curves.csv
    hashes: dict[str, str | None] = field(default_factory=dict)  # store entries used, by role
    reused: dict[str, bool] = field(default_factory=dict)  # which of them came from the store
    models: dict[str, StoredModel] = field(default_factory=dict)  # linked into <run dir>/checkpoints/
    seeds: list[int] = field(default_factory=list)  # results.json "seeds"


class Study(Protocol):
    name: str
    Settings: type

    def check(self, run: RunSettings, options: Any) -> None: ...

    def run(self, ctx: Context) -> StudyResult: ...

    def summary(self, results: Mapping[str, Any]) -> str: ...

    def figures(self, run_dir: Path, results: Mapping[str, Any], rows: list[dict]) -> list[Path]: ...


def study_names() -> list[str]:
    return list(STUDIES)


def load_study(section: Mapping[str, Any]) -> tuple[Study, Any]:
    """The study chosen by a ``study`` config section (``name``, or ``_target_``) and its parsed settings."""
    section = dict(section)
    target, name = section.pop("_target_", None), section.pop("name", None)
    if target is None:
        if name not in STUDIES:
            raise ConfigError(f"unknown study.name {show(name)}; valid: {', '.join(STUDIES)}; "
                              "or study._target_=<your study class's import path>")
        cls = locate(STUDIES[name], "study")
    else:
        cls = locate(target, "study._target_")
    study = cls()
    label = getattr(study, "name", target)
    options = parse(study.Settings, section, "study", f" for study {label}", also=("_target_", "name"))
    return study, options


def study_for_results(results: Mapping[str, Any]) -> Study:
    """The study that wrote ``results`` (runs from before studies existed are ``pair``)."""
    name = results.get("study", "pair")
    path = STUDIES.get(name, name if "." in str(name) else None)
    if path is None:
        raise ConfigError(f"results.json names study {show(name)}, which this lmc does not have; "
                          f"valid: {', '.join(STUDIES)}")
    return locate(path, "study")()
