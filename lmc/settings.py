"""Typed settings from plain mappings, checked once: the machinery every settings dataclass shares.

A settings class is a dataclass whose field annotations say what is valid; :func:`parse` turns a
mapping (a composed config section, as plain Python containers) into an instance, or raises
:class:`lmc.errors.ConfigError` with one line naming the key, the value and what is valid:

* an unknown key is refused with the valid keys (never accepted and ignored);
* ``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` (a choice), ``X | None``, ``list[X]``,
  ``tuple[X, ...]``, ``dict``, a nested settings dataclass, and ``Annotated[int | float, Min(...)]``
  for ranges;
* cross-field rules belong in the dataclass's ``__post_init__`` (raising ``ConfigError``).

The same checks apply to the keyword options of a class named by ``_target_`` (a user's model,
dataset or alignment method): :func:`parse_options` reads them off its constructor's signature.
Also here: :func:`locate` (import an object from its dotted path) and :func:`source_fingerprint`
(sha256 of the source that defines it, so that stored results of edited code are not reused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from lmc.errors import ConfigError

__all__ = ["Min", "NonNegative", "NonNegativeFloat", "NonNegativeInt", "Positive", "PositiveFloat", "PositiveInt",
           "coerce", "locate", "parse", "parse_options", "show", "signature_defaults", "source_fingerprint"]


@dataclass(frozen=True)
class Min:
    """A lower bound for an ``Annotated`` int or float field (``strict``: the bound itself is invalid)."""

    bound: float
    strict: bool = False

    def describe(self, kind: str) -> str:
        if self.bound == 0:
            return f"a positive {kind}" if self.strict else f"a non-negative {kind}"
        return f"{'an' if kind == 'integer' else 'a'} {kind} {'>' if self.strict else '≥'} {self.bound:g}"

    def holds(self, value: float) -> bool:
        return value > self.bound if self.strict else value >= self.bound


Positive = Min(0, strict=True)
NonNegative = Min(0)
PositiveInt = Annotated[int, Positive]
PositiveFloat = Annotated[float, Positive]
NonNegativeInt = Annotated[int, NonNegative]
NonNegativeFloat = Annotated[float, NonNegative]


def show(value: Any) -> str:
    """A value as a user typed it: strings quoted, everything else as Python prints it."""
    return repr(value) if isinstance(value, str) else str(value)


def _kind(tp: Any) -> str:
    """What a value of type ``tp`` is, in words (for messages)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked (and, for numbers and sequences, converted) against the annotation ``tp``."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *marks = typing.get_args(tp)
        bound = next((m for m in marks if isinstance(m, Min)), None)
        try:
            value = coerce(value, base, name)
        except ConfigError:
            if bound is None or base not in (int, float):
                raise
            raise ConfigError(f"{name} must be {bound.describe('integer' if base is int else 'number')}, "
                              f"got {show(value)}") from None
        for mark in marks:
            if isinstance(mark, Min) and value is not None and not mark.holds(value):
                kind = "integer" if base is int else "number"
                raise ConfigError(f"{name} must be {mark.describe(kind)}, got {show(value)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name} must be set (got null)")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        kinds = " or ".join(_kind(a) for a in args if a is not type(None))
        raise ConfigError(f"{name} must be {kinds}, got {show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"unknown {name} {show(value)}; valid: {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {show(value)}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ConfigError(f"{name} must be a list, got {show(value)}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {show(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                              f"got {show(value)}")
        return parse(tp, value, name)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{name} must be {_kind(tp)}, got {show(value)}")
        return value
    return value


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations (a user's class) are not checked
        return {}


def parse(cls: type, values: Mapping[str, Any], prefix: str, context: str = "", also: Sequence[str] = ()) -> Any:
    """An instance of the dataclass ``cls`` from ``values``; ``prefix`` names the config section in
    messages (``train`` → ``train.epochs``), ``context`` adds what the section configures, ``also`` the
    section's keys read elsewhere (listed as valid)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}{context}; valid: {', '.join(sorted([*fields, *also]))}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = coerce(values[name], hints.get(name, Any), f"{prefix}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{name} is required{context}")
    return cls(**kwargs)


def signature_defaults(fn: Callable, skip: int = 0) -> dict[str, Any]:
    """Keyword parameters of ``fn`` (a class: its constructor) after the first ``skip``, with their
    defaults (``None`` where required)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def parse_options(fn: Callable, values: Mapping[str, Any], prefix: str, what: str, skip: int = 0,
                  provided: Sequence[str] = ()) -> dict[str, Any]:
    """``values`` as keyword arguments of ``fn`` (a class: its constructor) after its first ``skip``
    parameters and besides those the caller ``provided`` itself: unknown keys refused with the valid ones
    (unless ``fn`` takes ``**kwargs``), missing required ones named, annotated types checked. ``what``
    names ``fn`` in messages."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = [p for p in list(inspect.signature(fn).parameters.values())[skip:] if p.name not in provided]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = [k for k in values if k not in named]
    if unknown and not open_ended:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]} for {what}; valid: {', '.join(named) or 'none'}")
    hints = _hints(target)
    out = {}
    for key, value in values.items():
        out[key] = coerce(value, hints.get(key, Any), f"{prefix}.{key}") if key in named else value
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in out]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]} is required by {what}; set {prefix}.{missing[0]}=<value>")
    return out


def locate(path: str, key: str) -> Any:
    """The object named by the dotted ``path`` (``package.module.Name``), importable from the working
    directory or ``PYTHONPATH``; ``key`` (e.g. ``model._target_``) is named in the error."""
    if not isinstance(path, str) or not path or path.startswith(".") or path.endswith("."):
        raise ConfigError(f"{key} must be a dotted import path such as mypkg.nets.MyNet, got {show(path)}")
    if "" not in sys.path and "." not in sys.path:  # `python -m` puts the working directory first; keep it so
        sys.path.insert(0, "")
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name) and exc.name != module_name:
                raise ConfigError(f"cannot import {key}={path}: its module needs '{exc.name}', "
                                  "which is not installed") from None
            continue
        except Exception as exc:  # noqa: BLE001 - a user's module failing at import is reported in one line
            raise ConfigError(f"cannot import {key}={path}: importing {module_name} raised "
                              f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"cannot import {key}={path}: {module_name} has no '{attr}'") from None
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(f"cannot import {key}={path}: no module '{parts[0]}' on the path "
                      "(the working directory or PYTHONPATH)") from None


def source_fingerprint(obj: Any) -> str:
    """sha256 (16 hex digits) of the source file of the module that defines ``obj`` — its helpers
    included — or, where there is no file, of ``obj``'s own source; ``""`` where there is neither."""
    module = inspect.getmodule(obj)
    text = None
    try:
        path = inspect.getsourcefile(module) if module is not None else None
        if path:
            text = Path(path).read_bytes()
    except (TypeError, OSError):
        text = None
    if text is None:
        try:
            text = inspect.getsource(obj).encode()
        except (TypeError, OSError):
            return ""
    return hashlib.sha256(text).hexdigest()[:16]
