"""The Hydra side of ``python -m lmc.run``: config nodes made from lmc's own classes, choices checked
before Hydra sees them, and the composed config turned into typed settings (:mod:`lmc.stages.settings`).

Defaults are written once, in code: each zoo model's options are its class's signature, each alignment
method's its dataclass fields, the training recipe's :class:`~lmc.core.training.TrainConfig`, the
interpolation's :class:`~lmc.stages.settings.InterpSettings`. :func:`register_configs` turns them into
config nodes (``model=<name>``, ``align=<name>``, ``interp=default``, the ``_defaults`` every
``train=``/``data=``/``logger=``/``study=`` file starts from, and ``data/_<name>``, a built-in dataset's
reader options with their defaults for ``conf/data/<name>.yaml`` to start from), so ``--cfg job`` and
every override see them, while ``conf/`` keeps only named choices: datasets' constants, recipes,
experiments, studies, sweeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lmc.core.alignment import ALIGN_METHODS
from lmc.core.data import DATASETS, LOCATION, NOT_LOADER_OPTIONS
from lmc.core.models import MODELS
from lmc.core.training import TrainConfig
from lmc.errors import ConfigError
from lmc.settings import signature_defaults
from lmc.stages.settings import DataSettings, InterpSettings, LoggerSettings, RunSettings, parse_run
from lmc.studies import STUDIES

__all__ = ["CONF_DIR", "check_group_choices", "explicit_keys", "group_options", "register_configs",
           "settings_from_config"]

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def register_configs() -> None:
    """Config nodes generated from lmc's classes (idempotent)."""
    cs = ConfigStore.instance()
    for name, cls in MODELS.items():
        cs.store(group="model", name=name, node={"name": name, "_target_": None, **signature_defaults(cls, skip=2)})
    for name, cls in ALIGN_METHODS.items():
        cs.store(group="align", name=name, node={"method": name, "merge": "none", "_target_": None, **asdict(cls())})
    cs.store(group="interp", name="default", node=asdict(InterpSettings()))
    cs.store(group="train", name="_defaults", node=asdict(TrainConfig()))
    data_defaults = {f.name: f.default for f in fields(DataSettings)
                     if f.name in NOT_LOADER_OPTIONS and f.name != "name"}
    cs.store(group="data", name="_defaults", node={"_target_": None, **data_defaults})
    for name, (reader, _) in DATASETS.items():  # data/_<name>: lmc's data keys and the reader's own options
        options = {k: v for k, v in signature_defaults(reader).items() if k not in LOCATION}
        cs.store(group="data", name=f"_{name}", node={"_target_": None, **data_defaults, **options})
    cs.store(group="logger", name="_defaults", node={k: v for k, v in asdict(LoggerSettings()).items() if k != "name"})
    cs.store(group="study", name="_defaults", node={"_target_": None})
    if not OmegaConf.has_resolver("lmc_help"):
        OmegaConf.register_new_resolver("lmc_help", lambda what: _HELP[what]())


def group_options(group: str) -> list[str]:
    """The choices of config group ``group``: yaml files in ``conf/<group>/`` and generated nodes, without
    the ``_``-prefixed ones other files build on."""
    names = {p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")}
    repo = ConfigStore.instance().repo
    node = repo.get(group, {})
    names |= {key.removesuffix(".yaml") for key in node if key.endswith(".yaml")}
    return sorted(n for n in names if not n.startswith("_"))


def _groups() -> list[str]:
    on_disk = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    generated = {g for g, v in ConfigStore.instance().repo.items() if isinstance(v, dict) and g != "hydra"}
    return sorted(on_disk | generated)


def _groups_help() -> str:
    return "\n".join(f"{g}: {', '.join(group_options(g))}" for g in _groups())


def _studies_help() -> str:
    from lmc.settings import locate

    lines, width = [], max(map(len, STUDIES))
    for name, path in STUDIES.items():
        doc = (locate(path, "study").__doc__ or "").strip().splitlines()
        lines.append(f"  study={name:<{width}}  {doc[0] if doc else ''}")
    return "\n".join(lines)


_HELP = {"groups": _groups_help, "studies": _studies_help}


def check_group_choices(overrides: Sequence[str], conf_dir: str | Path = CONF_DIR) -> None:
    """Command-line choices of config groups (``experiment=foo``, ``model=a,b``) must name options of the
    group; Hydra's own error for a missing one spans several lines."""
    register_configs()
    groups = set(_groups()) if Path(conf_dir) == Path(CONF_DIR) else {p.name for p in Path(conf_dir).iterdir()}
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key.startswith(("hydra", "-")) or key not in groups or "(" in value or not value:
            continue
        valid = group_options(key)
        for choice in value.split(","):
            if choice.strip() not in (*valid, "null"):
                raise ConfigError(f"unknown {key} '{choice.strip()}'; valid: {', '.join(valid)}")


def explicit_keys(overrides: Sequence[str]) -> set[str]:
    """The dotted keys a list of overrides sets (``model.depth=4``, ``+model.x=1`` → ``model.depth``, ``model.x``)."""
    return {o.lstrip("+~").partition("=")[0] for o in overrides if "=" in o}


def settings_from_config(cfg: DictConfig | dict[str, Any], overrides: Sequence[str] = ()) -> RunSettings:
    """The composed config, checked, as :class:`RunSettings` (one ConfigError line for anything wrong)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return parse_run(container, explicit_keys(overrides))
