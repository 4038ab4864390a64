"""Nested frozen-dataclass configs: change fields by dotted path, parse typed values, diff.

The configs nest — ``ModelConfig.lmm`` is an ``LMMConfig``, whose ``memory`` is a
``MemoryConfig`` — and each field is defined once, with its one default, at the level it
belongs to. A change names its field by path:

    replace(config, {"d_model": 64, "lmm.theta_max": 0.05, "lmm.memory.impl": "reference"})
    replace(config, {"lmm": {"use_momentum": False, "memory": {"depth": 1}}})  # the same, nested

Nested dicts are merged into the current sub-config (fields not named keep their values);
a dataclass instance replaces the sub-config whole. Unknown fields and ill-typed values raise
errors that name the path and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any


def _is_config(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _flatten(changes: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "a.c": 2} -> {"a.b": 1, "a.c": 2}; dataclass instances are leaves."""
    flat = {}
    for key, value in changes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"config field paths are non-empty strings, got {key!r}")
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted paths and nested dicts -> one nested dict (later entries win)."""
    nested: dict[str, Any] = {}
    for path, value in _flatten(changes).items():
        *parents, leaf = path.split(".")
        node = nested
        for name in parents:
            if not isinstance(node.get(name, {}), dict):
                raise ValueError(f"{path!r} sets a field inside {name!r}, which the same changes set whole")
            node = node.setdefault(name, {})
        node[leaf] = value
    return nested


def replace(config, changes: Mapping[str, Any], *, _path: str = ""):
    """`config` with `changes` applied (dotted paths or nested dicts, see the module doc)."""
    cls = type(config)
    types_ = field_types(cls)
    updates = {}
    for name, value in _nest(changes).items():
        path = _path + name
        if name not in types_:
            raise ValueError(f"{cls.__name__} has no field {name!r} (in {path!r}); its fields are {sorted(types_)}")
        current = getattr(config, name)
        if isinstance(value, Mapping):
            if not _is_config(current):
                raise ValueError(f"{path!r} is not a nested config; give it a value, not sub-fields")
            value = replace(current, value, _path=path + ".")
        updates[name] = value
    return dataclasses.replace(config, **updates)


def annotation_at(cls, path: str):
    """The annotation of the field at a dotted path, e.g. annotation_at(ModelConfig, "lmm.memory.depth")."""
    head, _, rest = path.partition(".")
    types_ = field_types(cls)
    if head not in types_:
        raise ValueError(f"{cls.__name__} has no field {head!r}; its fields are {sorted(types_)}")
    annotation = types_[head]
    if rest:
        if not (isinstance(annotation, type) and dataclasses.is_dataclass(annotation)):
            raise ValueError(f"{cls.__name__}.{head} is not a nested config, so {path!r} names nothing")
        return annotation_at(annotation, rest)
    return annotation


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def parse_value(text: str, annotation, key: str = "value") -> Any:
    """A command-line string as a value of the annotated type; a clear error naming `key` and
    the expected type otherwise. Supports bool, int, float, str, tuple[...] (comma separated),
    Optional / unions of those (``None`` for None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if text == "None" and type(None) in options:
            return None
        for option in sorted((o for o in options if o is not type(None)), key=lambda o: o is str):
            try:
                return parse_value(text, option, key)
            except ValueError:
                pass
        raise ValueError(f"{key}={text!r}: expected one of {[_type_name(o) for o in options]}")
    if annotation is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{key}={text!r}: expected a boolean (true / false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected a number (float)") from None
    if origin is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis] or [str]
        return tuple(parse_value(part, args[0], key) for part in text.split(",") if part)
    if annotation is str or annotation is Any:
        return text
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        raise ValueError(f"{key} is a nested config; set its fields, e.g. {key}.<field>=...")
    raise ValueError(f"{key}: cannot parse a value of type {_type_name(annotation)} from the command line")


def parse_assignments(cls, items: list[str]) -> dict[str, Any]:
    """Command-line ``KEY=VALUE`` items -> {dotted field path of cls: value of that field's type};
    a ValueError naming the item otherwise (missing '=', unknown field, unparsable value)."""
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            changes[key] = parse_value(text, annotation_at(cls, key), key)
        except ValueError as error:
            raise ValueError(f"{item!r}: {error}") from None
    return changes


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested dicts / configs: ["a.b: 1 -> 2", ...]."""
    old = dataclasses.asdict(old) if _is_config(old) else old
    new = dataclasses.asdict(new) if _is_config(new) else new
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            if key not in old:
                lines.append(f"{prefix}{key}: (absent) -> {new[key]!r}")
            elif key not in new:
                lines.append(f"{prefix}{key}: {old[key]!r} -> (absent)")
            else:
                lines.extend(diff(old[key], new[key], f"{prefix}{key}."))
        return lines
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def from_dict(cls, data: Mapping[str, Any], _path: str = ""):
    """The config of type `cls` from a (JSON-loaded) nested dict, e.g. the model_config saved
    beside a run; unknown keys are refused with their path (a config of another version)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{_path or cls.__name__}: expected a dict of {cls.__name__} fields, got {type(data).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {[_path + name for name in unknown]} (written by another "
                         f"version of the config?); its fields are {sorted(types_)}")
    values = {}
    for name, value in data.items():
        annotation = types_[name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
            value = from_dict(annotation, value, f"{_path}{name}.")
        elif typing.get_origin(annotation) is tuple and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        values[name] = value
    return cls(**values)
