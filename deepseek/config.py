"""Dataclass configs <-> dicts, JSON and YAML, with ``key=value`` overrides.

Every config in the framework is a plain dataclass. This module turns dicts (from JSON, YAML or the
command line) into those dataclasses and back, and refuses anything it does not understand: an
unknown key is an error that lists the valid keys, a value of the wrong type names the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config could not be built: unknown key, wrong type or invalid value."""


def _describe(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` to ``annotation`` where that is lossless, else raise ConfigError."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, prefix=f"{where}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads YAML 1.1, where `3e-4` (no dot) is a string, in files and `key=value` overrides alike.
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError listing the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)} "
            f"for {cls.__name__}; valid keys: {_describe(cls)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass as a plain dict of JSON-compatible values (nested dataclasses included)."""
    return dataclasses.asdict(obj)


def _parse_value(text: str) -> Any:
    # YAML scalars give `3` -> int, `1e-3` -> float, `true` -> bool, `[a, b]` -> list, `null` -> None.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(obj: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of dataclass ``obj`` with ``a.b=value`` overrides applied (validated like from_dict)."""
    data = to_dict(obj)
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    for dotted, value in items:
        node = data
        keys = dotted.split(".")
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"{where!r} is not a config section; cannot set {dotted!r}")
            node = node[key]
        node[keys[-1]] = value
    return from_dict(type(obj), data)


def split_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``, the value parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value)


def load_file(cls: type[T], path: str | Path) -> T:
    """Read a dataclass from a ``.json`` or ``.yaml``/``.yml`` file."""
    return from_dict(cls, read_mapping(path))


def read_mapping(path: str | Path) -> Any:
    """What a ``.json`` or ``.yaml``/``.yml`` config file holds, parsed (an empty file is ``{}``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    return data or {}


def save_file(obj: Any, path: str | Path) -> None:
    """Write a dataclass as JSON (``.json``) or YAML, atomically (its folder is created if needed)."""
    from deepseek.atomic import write_file_atomically

    path = Path(path)
    data = to_dict(obj)
    write_file_atomically(path, json.dumps(data, indent=2) + "\n" if path.suffix == ".json"
                          else yaml.safe_dump(data, sort_keys=False))
