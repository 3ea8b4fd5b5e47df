"""The typed settings of a run, built and checked once from the composed configuration.

:func:`parse_run` turns the composed config (plain Python containers, no Hydra) into a
:class:`RunSettings`; every stage and study takes these dataclasses, never a ``DictConfig``. A bad
type, range, choice or unknown key raises :class:`lmc.errors.ConfigError` with one line naming the key,
the value and what is valid — before anything is loaded, trained or written.

Defaults live in one place each: the options of models and alignment methods in their classes'
signatures (``lmc.core.models``, ``lmc.core.alignment``), the training recipe's in
:class:`lmc.core.training.TrainConfig`, the rest in the dataclasses below. ``conf/`` files hold named
choices (a dataset's constants, a recipe, an experiment, a study), never restated defaults.

Models, datasets and alignment methods are chosen by name from lmc's registries, or by
``_target_``: the import path of a user's own class (a model ``cls(input_shape, num_classes, **options)``;
a dataset loader returning ``x_train, y_train, x_test, y_test``; an alignment method called as
``method(spec, model_a, model_b, data)``), whose options are checked against its signature. The
store identity of such a class includes a fingerprint of its module's source, so edited code never
reuses results of the old code.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import torch
from torch import nn

from lmc.core.alignment import ALIGN_METHODS, MERGE_MODES, AlignmentMethod, WeightMatching, check_merge
from lmc.core.data import (
    DATASETS,
    LOCATION,
    NOT_LOADER_OPTIONS,
    REQUIRED,
    Augmentation,
    Dataset,
    load_dataset,
    reader_options,
)
from lmc.core.models import MODELS
from lmc.core.normalization import check_reset_bn
from lmc.core.training import TrainConfig
from lmc.errors import ConfigError
from lmc.settings import (
    Min,
    NonNegativeInt,
    PositiveInt,
    coerce,
    locate,
    parse,
    parse_options,
    show,
    signature_defaults,
    source_fingerprint,
)

__all__ = ["DEVICES", "AlignSettings", "DataSettings", "InterpSettings", "LoggerSettings", "ModelSettings",
           "RunSettings", "SpawnSettings", "StoreSettings", "check_seeds", "parse_run", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")
Fraction = Annotated[float, Min(0)]


def _target_of(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


# ----------------------------------------------------------------------------------------------- data

@dataclass
class DataSettings:
    """``data.*``: which dataset, where it lives, how it is normalised, augmented and split."""

    name: str  # a built-in dataset (conf/data/<name>.yaml), or the import path of data._target_
    target: str | None = None  # import path of a user's loader (data._target_)
    root: str = "${oc.env:DATA_DIR,data}"  # dataset folder ($DATA_DIR, else ./data)
    download: bool = False  # fetch a missing vision dataset at run time (prefer `python -m lmc.data download`)
    mean: list[float] | None = None  # per-channel mean subtracted on the device (x ← (x − mean) / std)
    std: list[float] | None = None  # per-channel std
    augment: bool = False  # random crop (reflect padding) + horizontal flip of training batches (images)
    crop_padding: NonNegativeInt = 4  # pixels of padding on each side before the random crop
    flip: bool = True  # random horizontal flip (with augment)
    split: Literal["none", "halves", "classes"] = "none"  # training data of model A vs B (lmc.core.data.split_pair)
    split_fraction: Fraction = 0.2  # classes split: share of the other half's classes each model also sees
    split_seed: NonNegativeInt = 0  # shuffles the training set before splitting
    options: dict = field(default_factory=dict)  # the loader's own keys (data=tensors: path)
    source: str = ""  # fingerprint of a user loader's source

    def __post_init__(self) -> None:
        if not 0 <= self.split_fraction <= 1:
            raise ConfigError(f"data.split_fraction must be in [0, 1], got {self.split_fraction}")

    @property
    def loader(self) -> str:
        return self.target or self.name

    def load(self, device: torch.device | str = "cpu") -> Dataset:
        augment = Augmentation(self.crop_padding, self.flip) if self.augment else None
        return load_dataset(self.target or self.name, self.root, download=self.download, mean=self.mean,
                            std=self.std, device=device, augment=augment, **self.options)

    def identity(self, fingerprint: str) -> dict:
        """What determines the data a model sees: every setting but where the files live, and the
        fingerprint of the arrays actually loaded."""
        out = {k: v for k, v in asdict(self).items() if k not in ("root", "download", "options", "source", "target")}
        out.update(self.options)
        if self.target:
            out.update(target=self.target, source=self.source)
        out["fingerprint"] = fingerprint
        return out


def parse_data(values: Mapping[str, Any]) -> DataSettings:
    """A built-in dataset by ``name`` or a user's loader by ``_target_``; the keys that are not lmc's own
    (``path`` of ``data=tensors``, a loader's arguments) are checked against the reader's signature."""
    values = dict(values)
    target = values.pop("_target_", None)
    name = values.get("name")
    options = {k: values.pop(k) for k in list(values) if k not in NOT_LOADER_OPTIONS}
    if target is None:
        if not isinstance(name, str) or name not in DATASETS:
            raise ConfigError(f"unknown data.name {show(name)}; valid: {', '.join(sorted(DATASETS))}; "
                              "or data._target_=<your loader's import path>")
        for key, what in REQUIRED.get(name, {}).items():
            if options.get(key) is None:
                raise ConfigError(f"data={name} needs data.{key}={what}")
        loader, what, source = DATASETS[name][0], f"dataset '{name}'", ""
    else:
        loader = locate(target, "data._target_")
        if not callable(loader):
            raise ConfigError(f"data._target_={target} is not a class or function")
        values["name"], what, source = target, f"dataset {target}", source_fingerprint(loader)
    own = reader_options(loader)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(loader).parameters.values())
    unknown = [k for k in options if k not in own and not takes_any]
    if unknown:
        valid = [k for k in NOT_LOADER_OPTIONS if k != "_target_"] + own + ["_target_"]
        raise ConfigError(f"unknown key data.{unknown[0]} for {what}; valid: {', '.join(valid)}")
    options = parse_options(loader, options, "data", what, provided=LOCATION)
    settings = parse(DataSettings, values, "data")
    settings.options, settings.target, settings.source = options, target, source
    return settings


# ---------------------------------------------------------------------------------------------- model

@dataclass
class ModelSettings:
    """``model.*``: the architecture — a zoo model by ``name`` or a user's class by ``_target_`` — and
    its options (checked against the class's signature)."""

    name: str  # zoo name (mlp, vgg, resnet20, resnet18, cnn1d) or, for a user's class, its import path
    target: str  # import path of the class
    options: dict  # keyword arguments after (input_shape, num_classes)
    source: str  # fingerprint of the source of the class's module: part of the store identity

    @property
    def cls(self) -> type[nn.Module]:
        return locate(self.target, "model._target_")

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        try:
            model = self.cls(tuple(input_shape), num_classes, **self.options)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user's class failing to build is one line
            raise ConfigError(f"model {self.target}({', '.join(f'{k}={v!r}' for k, v in self.options.items())}) "
                              f"failed for input shape {tuple(input_shape)} and {num_classes} classes: "
                              f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model._target_={self.target} built a {type(model).__name__}, not a torch nn.Module")
        return model

    def identity(self) -> dict:
        return {"name": self.name, "target": self.target, "options": dict(self.options), "source": self.source}


def parse_model(values: Mapping[str, Any], explicit: Collection[str] = ()) -> ModelSettings:
    """``explicit``: the ``model.<key>`` names set on the command line. When ``_target_`` replaces the zoo
    model whose config it came with (``model._target_=mypkg.MyNet`` on top of the default ``mlp``), that
    zoo model's options (``width: 512``…) stay behind unless set explicitly: the class gets its own defaults."""
    values = dict(values)
    target, name = values.pop("_target_", None), values.pop("name", None)
    zoo = {cls: zoo_name for zoo_name, cls in MODELS.items()}
    if target is None:
        if not isinstance(name, str) or name not in MODELS:
            raise ConfigError(f"unknown model.name {show(name)}; valid: {', '.join(sorted(MODELS))}; "
                              "or model._target_=<your class's import path>")
        cls = MODELS[name]
    else:
        cls = locate(target, "model._target_")
        if not callable(cls):
            raise ConfigError(f"model._target_={target} is not a class")
        if isinstance(name, str) and name in MODELS and MODELS[name] is not cls:
            inherited = signature_defaults(MODELS[name], skip=2)
            for key in list(values):
                if key in inherited and key not in explicit and values[key] == inherited[key]:
                    del values[key]  # the replaced zoo model's option, not the user's
        name = zoo.get(cls, target)
    what = f"model {name}" if cls in zoo else f"model {target}"
    options = parse_options(cls, values, "model", what, skip=2)
    return ModelSettings(name=name, target=_target_of(cls) if cls in zoo else target, options=options,
                         source=source_fingerprint(cls))


# ------------------------------------------------------------------------------------------ alignment

@dataclass
class AlignSettings:
    """``align.*``: the alignment method — built-in by ``method`` or a user's by ``_target_`` — its
    options, and how several models are merged (``merge``)."""

    method: str  # built-in name, or the import path of align._target_ (the label of its curves)
    target: str | None  # import path of a user's method class
    merge: str  # none | reference | merge_many
    options: dict  # the method's options
    source: str = ""  # fingerprint of a user method's source

    def build(self) -> AlignmentMethod:
        cls = locate(self.target, "align._target_") if self.target else ALIGN_METHODS[self.method]
        return cls(**self.options)

    def identity(self) -> dict:
        """What determines the permutation (``merge`` does not: it says how many models are aligned)."""
        out = {"method": self.method, **self.options}
        if self.target:
            out.update(target=self.target, source=self.source)
        return out


def parse_align(values: Mapping[str, Any]) -> AlignSettings:
    values = dict(values)
    target, method, merge = values.pop("_target_", None), values.pop("method", None), values.pop("merge", "none")
    if merge not in MERGE_MODES:
        raise ConfigError(f"unknown align.merge {show(merge)}; valid: {', '.join(MERGE_MODES)}")
    if target is None:
        if method not in ALIGN_METHODS:
            raise ConfigError(f"unknown align.method {show(method)}; valid: {', '.join(sorted(ALIGN_METHODS))}; "
                              "or align._target_=<your method's import path>")
        check_merge(merge, method)
        cls = ALIGN_METHODS[method]
        context = f" for align.method={method}"
        options = asdict(parse(cls, values, "align", context, also=("_target_", "merge", "method")))
        return AlignSettings(method, None, merge, options)
    cls = locate(target, "align._target_")
    if not callable(cls):
        raise ConfigError(f"align._target_={target} is not a class")
    if merge == "merge_many" and cls is not WeightMatching:
        raise ConfigError(f"align.merge=merge_many uses weight matching, got align._target_={target}; "
                          "valid: weight_matching")
    if method in ALIGN_METHODS:  # the align group's own keys at their defaults are not meant for this class
        accepted = inspect.signature(cls).parameters
        defaults = asdict(ALIGN_METHODS[method]())
        values = {k: v for k, v in values.items() if k in accepted or k not in defaults or v != defaults[k]}
    options = parse_options(cls, values, "align", f"alignment method {target}")
    label = next((n for n, c in ALIGN_METHODS.items() if c is cls), target)
    return AlignSettings(label, None if label in ALIGN_METHODS else target, merge, options,
                         "" if label in ALIGN_METHODS else source_fingerprint(cls))


# --------------------------------------------------------------------------------------------- others

@dataclass
class InterpSettings:
    """``interp.*``: the α sweep and the corrections applied at every α."""

    num_alphas: int = 25  # α ∈ linspace(0, 1, num_alphas)
    layerwise: bool = True  # also interpolate one layer at a time (others at model A)
    reset_bn: Any = "auto"  # recompute BatchNorm running stats at every α: auto (= model has BatchNorm) | true | false
    repair: bool = False  # REPAIR (Jordan et al. 2022): rescale channels to the interpolated endpoint statistics
    stat_batches: PositiveInt = 10  # training batches for BatchNorm reset and REPAIR statistics
    stat_batch_size: PositiveInt = 500  # examples per such batch
    stat_seed: NonNegativeInt = 0  # draws those batches
    eval_batch_size: PositiveInt = 2048  # examples per forward pass when evaluating endpoints and every α

    def __post_init__(self) -> None:
        if self.num_alphas < 2:
            raise ConfigError(f"interp.num_alphas must be at least 2 (α = 0 and 1), got {self.num_alphas}")
        check_reset_bn(self.reset_bn)


@dataclass
class SpawnSettings:
    """``spawn.*`` (conf/config.yaml): Frankle et al.'s instability analysis."""

    step: int | None  # k: one parent trains k steps, the models continue from it; null = off
    # (its range, 0 … train.epochs × steps per epoch, is checked once the data is known)


@dataclass
class StoreSettings:
    """``store.*`` (conf/config.yaml): the run store."""

    root: str  # trained models, alignments, curves, keyed by hash
    on_corrupt: Literal["error", "retrain"]  # a corrupted stored checkpoint: stop and name it | retrain


@dataclass
class LoggerSettings:
    """``logger.*``: experiment tracking (local files are always written)."""

    name: Literal["wandb", "none"] = "wandb"
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto = online with credentials, else offline
    project: str = "lmc"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunSettings:
    """Everything one ``python -m lmc.run`` needs, checked."""

    name: str  # experiment name: results.json "experiment", output folder, W&B run name
    study: dict  # study name (or _target_) and the study's own keys; parsed by the study (lmc.studies)
    seeds: list  # init seeds (and, by default, data-order and augmentation seeds) of the models; checked by
    # the study that uses them (check_seeds), as are the two below
    data_seeds: list | None  # data-order seeds; null = seeds
    aug_seeds: list | None  # augmentation seeds; null = seeds
    spawn: SpawnSettings
    store: StoreSettings
    device: str  # auto | cpu | cuda | cuda:N
    progress: bool  # progress bars on the terminal
    data: DataSettings
    model: ModelSettings
    train: TrainConfig
    align: AlignSettings
    interp: InterpSettings
    logger: LoggerSettings
    config: dict = field(default_factory=dict, repr=False)  # the composed config, as results.json records it


def check_seeds(seeds: Any, count: int = 2, at_least: bool = False, name: str = "seeds",
                distinct: bool = True) -> list[int]:
    """``seeds`` as a list of ``count`` (or, with ``at_least``, ``count`` or more) integers ≥ 0, distinct
    unless ``distinct=False``; ``name`` is the config key named in the error."""
    values = list(seeds) if isinstance(seeds, Sequence) and not isinstance(seeds, str) else None
    if (
        values is None
        or (len(values) < count if at_least else len(values) != count)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in values)
        or (distinct and len(set(values)) != len(values))
    ):
        example = ",".join(str(i) for i in range(count + at_least))
        kind = "distinct integers" if distinct else "integers"
        if at_least:
            raise ConfigError(f"{name} must be at least {count} {kind} when merging several models, "
                              f"e.g. {name}=[{example}]; got {show(seeds)}")
        raise ConfigError(f"{name} must be {count} {kind}, e.g. {name}=[{example}]; got {show(seeds)}")
    if any(s < 0 for s in values):
        raise ConfigError(f"{name} must be non-negative integers (they seed numpy too), got {show(seeds)}")
    return values


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError(f"unknown device {show(device)}; valid: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but no CUDA device is available; use device=cpu or auto")
    return torch.device(device)


_SECTIONS = ("data", "model", "train", "align", "interp", "logger", "spawn", "store", "study")
_TOP = ("name", "seeds", "data_seeds", "aug_seeds", "device", "progress", *_SECTIONS)


def parse_run(config: Mapping[str, Any], explicit: Collection[str] = ()) -> RunSettings:
    """:class:`RunSettings` from the composed config as plain containers (``hydra`` key ignored);
    ``explicit`` are the dotted keys set on the command line."""
    config = {k: v for k, v in config.items() if k != "hydra"}
    unknown = [k for k in config if k not in _TOP]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}; valid top-level keys: {', '.join(_TOP)}")
    for section in _SECTIONS:
        if not isinstance(config.get(section), Mapping):
            raise ConfigError(f"{section} must be a config section (a mapping), got {show(config.get(section))}")
    seeds = config.get("seeds") or []  # how many, and how they are used, is the study's to check (check_seeds)
    device = config.get("device")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ConfigError(f"unknown device {show(device)}; valid: {', '.join(DEVICES)}")
    model_explicit = {k.split(".", 1)[1] for k in explicit if k.startswith("model.")}
    model = parse_model(config["model"], model_explicit)
    data = parse_data(config["data"])
    # results.json records what ran: the options the model class got, the loader's name
    config["model"] = {"name": model.name, "_target_": config["model"].get("_target_"), **model.options}
    config["data"] = {**config["data"], "name": data.name}
    return RunSettings(
        name=coerce(config.get("name"), str, "name"),
        study=dict(config["study"]),
        seeds=seeds,
        data_seeds=config.get("data_seeds"),
        aug_seeds=config.get("aug_seeds"),
        spawn=parse(SpawnSettings, config["spawn"], "spawn"),
        store=parse(StoreSettings, config["store"], "store"),
        device=device,
        progress=coerce(config.get("progress"), bool, "progress"),
        data=data,
        model=model,
        train=parse(TrainConfig, config["train"], "train"),
        align=parse_align(config["align"]),
        interp=parse(InterpSettings, config["interp"], "interp"),
        logger=parse(LoggerSettings, config["logger"], "logger"),
        config=dict(config),
    )

