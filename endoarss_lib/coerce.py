"""Typed configuration fields: check and convert values by a dataclass field's type hint, with clear errors.

Used for run configs (:class:`endoarss_lib.config.TrainConfig`), model options
(:class:`endoarss_lib.models.ModelConfig`) and command-line ``key=value`` overrides. Text from the command line and
YAML files is read with :data:`YAMLLoader`, which keeps YAML 1.1's surprises out: ``off``, ``no``, ``on``, ``yes``
stay strings (a field typed ``bool`` still accepts them as booleans), and ``1e-3`` is a number. Every error names the
field, the value, what was expected and, for choices, the valid values.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

import yaml

__all__ = ["ConfigError", "YAMLLoader", "parse_text", "coerce", "check_fields", "describe_type", "field_help"]


class ConfigError(ValueError):
    """A configuration value has the wrong type or is not one of the allowed values."""


class YAMLLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false) and floats in exponent form without a dot (``1e-3``)."""


YAMLLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))

_TRUE = {"true", "yes", "on", "y", "1"}
_FALSE = {"false", "no", "off", "n", "0"}
_NONE = {"none", "null", "~", ""}
_INT = re.compile(r"^[-+]?[0-9]+$")


def parse_text(text: str) -> Any:
    """A command-line value as YAML (1.2 booleans): ``3`` -> 3, ``[1, 2]`` -> [1, 2], ``off`` -> ``"off"``."""
    try:
        return yaml.load(text, Loader=YAMLLoader)
    except yaml.YAMLError:
        return text


def describe_type(hint: Any) -> str:
    """Human wording of a type hint: ``int | None`` -> 'an int or null'."""
    if hint is Any:
        return "any value"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin in (tuple, list) or hint in (tuple, list):
        return "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint, getattr(
        hint, "__name__", str(hint)))


def _fail(name: str, value: Any, expected: str, hint: str = "") -> ConfigError:
    return ConfigError(f"{name}={value!r}: expected {expected}{hint}")


def coerce(name: str, value: Any, hint: Any, choices: tuple | None = None) -> Any:
    """``value`` converted to ``hint`` (bool / int / float / str / None / unions / tuples / dicts); ConfigError else.

    Strings are converted as a command line would mean them (``"3"`` -> 3 for an int, ``"off"`` -> False for a
    bool); a float with a fraction for an int, ``"flase"`` for a bool, or text for a number are errors.
    """
    out = _coerce(name, value, hint)
    if choices is not None and out not in choices:
        raise _fail(name, value, f"one of {list(choices)}")
    return out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as exc:
                errors.append(exc)
        raise _fail(name, value, describe_type(hint))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _fail(name, value, "true or false", " (also yes/no, on/off, 1/0)")
    if hint is int:
        if isinstance(value, bool):
            raise _fail(name, value, "an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
            return int(value)
        if isinstance(value, str) and _INT.match(value.strip()):
            return int(value.strip())
        raise _fail(name, value, "an int")
    if hint is float:
        if isinstance(value, bool):
            raise _fail(name, value, "a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _fail(name, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _fail(name, value, "a string")
    if origin in (tuple, list) or hint in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _fail(name, value, "a list")
        inner = [a for a in args if a is not Ellipsis]
        if len(inner) == 1:
            return tuple(_coerce(f"{name}[{i}]", v, inner[0]) for i, v in enumerate(value))
        return tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _fail(name, value, "a mapping (e.g. {key: value})")
        if len(args) == 2:
            return {_coerce(f"{name} key", k, args[0]): _coerce(f"{name}[{k!r}]", v, args[1])
                    for k, v in value.items()}
        return dict(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _fail(name, value, describe_type(hint))


def check_fields(obj: Any, prefix: str = "") -> None:
    """Coerce every field of dataclass instance ``obj`` in place by its type hint and ``choices`` metadata."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name, Any)
        if dataclasses.is_dataclass(hint):
            continue
        value = getattr(obj, f.name)
        setattr(obj, f.name, coerce(f"{prefix}{f.name}", value, hint, f.metadata.get("choices")))


def field_help(cls) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, meaning)`` of every field of dataclass ``cls`` (for ``--help``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        if dataclasses.is_dataclass(default):
            default = "(see below)"
        kind = describe_type(hints.get(f.name, Any))
        if f.metadata.get("choices"):
            kind = " | ".join(map(str, f.metadata["choices"]))
        rows.append((f.name, kind, repr(default), f.metadata.get("help", "")))
    return rows
