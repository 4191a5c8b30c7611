"""Typed configuration fields: check and convert values by a dataclass field's type hint, with clear errors.

Used for run configs (:class:`endoarss_lib.config.TrainConfig`), model options
(:class:`endoarss_lib.models.ModelConfig`) and command-line ``key=value`` overrides.

What the user typed keeps its meaning: a command-line value, and every unquoted scalar of a config file read with
:class:`TextLoader`, is a :class:`Text` (the exact characters) until the field it is given to says its type. A text
field keeps the text (``run_name=2024_01`` is ``'2024_01'``, not 202401; ``007``, ``12:30``, ``1e3``, ``0x10`` stay as
written); a number field converts it exactly or refuses it (``epochs=1e3`` is 1000, ``epochs=2.5`` an error; ``lr=inf``
and ``lr=nan`` are errors: every number must be finite); a bool field takes true/false (also yes/no, on/off, 1/0);
fields without a declared type (``id_map``, hyper-parameter mappings) read the text as YAML 1.2 would (``off``,
``no``, ``on``, ``yes`` stay strings, ``1e-3`` is a number). Choices are matched ignoring case, ``-``, ``_`` and
spaces (``DB-MTL``, ``dbmtl`` and ``db_mtl`` are one method) and always stored in their one canonical spelling. YAML
files with a key given twice are refused, naming the key and both lines. Every error names the field, the value,
what was expected and, for choices and field names, the closest valid ones ("did you mean ...").
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Union

import yaml

__all__ = ["ConfigError", "YAMLLoader", "TextLoader", "UniqueKeyLoader", "Text", "DuplicateKeyError", "parse_text",
           "read_text_yaml", "typed", "coerce", "check_fields", "describe_type", "field_help", "canonical_choice",
           "did_you_mean", "choice_key", "NULL_WORDS"]


class ConfigError(ValueError):
    """A configuration value has the wrong type or is not one of the allowed values."""


class Text(str):
    """A value exactly as the user typed it (a command-line value, or an unquoted scalar of a config file): its type
    is the type of the field it is given to (:func:`coerce`), or YAML's reading of it where a field declares none
    (:func:`typed`)."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives the same key twice (YAML itself would silently keep the last value)."""

    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"line {line}: key {str(key)!r} is given twice (first on line {first_line}); YAML would "
                         f"silently keep only the last value. Keep one of them")


class _UniqueKeys:
    """Mixin for PyYAML loaders: a mapping with a key given twice is a :class:`DuplicateKeyError` (merge keys
    ``<<`` and the keys they bring are exempt: overriding a merged key is what they are for)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if first is not None:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1, first)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class UniqueKeyLoader(_UniqueKeys, yaml.SafeLoader):
    """PyYAML's SafeLoader (YAML 1.1 typing unchanged) with duplicate keys refused."""


class YAMLLoader(_UniqueKeys, yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false), floats in exponent form without a dot (``1e-3``) and
    duplicate keys refused."""


YAMLLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))

_TEXT_TAG = "tag:endoarss,2024:text"


class TextLoader(_UniqueKeys, yaml.SafeLoader):
    """Loader of config files: every unquoted scalar is a :class:`Text` (its exact characters), typed later by the
    field it is given to; quoted scalars are strings, explicit tags (``!!int 3``) are kept; duplicate keys are
    refused."""

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:
            return _TEXT_TAG
        return super().resolve(kind, value, implicit)


TextLoader.add_constructor(_TEXT_TAG, lambda loader, node: Text(loader.construct_scalar(node)))

# Words that mean "no value" in a field that may be null (and for model.pretrained: no weights).
NULL_WORDS = ("none", "null", "~", "")
_TRUE = {"true", "yes", "on", "y", "1"}
_FALSE = {"false", "no", "off", "n", "0"}
_NONE = set(NULL_WORDS)
_INT = re.compile(r"^[-+]?[0-9]+$")
_DIGITS = r"[0-9](?:_?[0-9])*"
_NUMBER = re.compile(rf"^[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?[0-9]+)?$")
_NON_FINITE = re.compile(r"^[-+]?\.?(?:inf|infinity|nan)$", re.IGNORECASE)
_INT_LIMIT = 2 ** 63  # ints are refused outside the int64 range (seeds, counts and sizes beyond it mean nothing)


def parse_text(text: str) -> Any:
    """A command-line value as YAML (1.2 booleans): ``3`` -> 3, ``[1, 2]`` -> [1, 2], ``off`` -> ``"off"``."""
    try:
        return yaml.load(text, Loader=YAMLLoader)
    except yaml.YAMLError:
        return text


def read_text_yaml(text: str) -> Any:
    """YAML text (a config file, or a command-line value with structure such as ``{cls: 1, seg: 2}``) with every
    unquoted scalar kept as :class:`Text`; :class:`DuplicateKeyError` / ``yaml.YAMLError`` on bad YAML."""
    return yaml.load(text, Loader=TextLoader)


_YAML12_INT = re.compile(r"^[-+]?[0-9]+$")
_YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_YAML12_SPECIAL = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


def typed(value: Any) -> Any:
    """``value`` with every :class:`Text` read by YAML 1.2's core schema (``3`` -> 3, ``1e-3`` -> 0.001,
    ``true`` -> True, ``null`` / ``~`` / empty -> None, any other text a string: ``off``, ``0x10``, ``12:30``,
    ``1_000`` stay as written, never YAML 1.1's booleans, octal, sexagesimal or grouped numbers), in nested mappings
    and lists too; other values unchanged."""
    if isinstance(value, Text):
        text = value.strip()
        if text in ("null", "Null", "NULL", "~", ""):
            return None
        if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
            return text.lower() == "true"
        if _YAML12_INT.match(text):
            return int(text)
        if _YAML12_FLOAT.match(text):
            return float(text)
        if text.lower() in _YAML12_SPECIAL:
            return _YAML12_SPECIAL[text.lower()]
        return str(value)
    if isinstance(value, dict):
        return {typed(k): typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, tuple):
        return tuple(typed(v) for v in value)
    return value


def choice_key(text: str) -> str:
    """How choices are compared: case, ``-``, ``_``, spaces and dots ignored (``DB-MTL`` ~ ``db_mtl`` ~ ``dbmtl``)."""
    return re.sub(r"[\s_\-.]+", "", str(text).lower())


def did_you_mean(value: Any, options: Iterable, n: int = 3, synonyms: dict | None = None) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to ``value`` (difflib; ``synonyms`` maps other tools'
    words to ours, e.g. ``learning_rate`` -> ``lr``), or ``''``."""
    options = [str(o) for o in options]
    text = str(value)
    if synonyms and choice_key(text) in synonyms and synonyms[choice_key(text)] in options:
        return f" (did you mean {synonyms[choice_key(text)]!r}?)"
    by_key = {choice_key(o): o for o in options}
    close = difflib.get_close_matches(choice_key(text), list(by_key), n=n, cutoff=0.6)
    names = [by_key[c] for c in close] or difflib.get_close_matches(text, options, n=n, cutoff=0.6)
    if not names:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in names)}?)"


def canonical_choice(name: str, value: Any, choices: Iterable, what: str = "one of") -> Any:
    """``value`` as the one spelling of ``choices`` it means: an exact match, else the single choice equal to it
    ignoring case, ``-``, ``_``, spaces and dots; ConfigError naming the field, the choices and the closest ones
    otherwise."""
    choices = list(choices)
    if isinstance(value, str):
        exact = [c for c in choices if isinstance(c, str) and c == value]
        if exact:
            return exact[0]  # the choice itself (a plain str, never the Text it was typed as)
        matches = [c for c in choices if isinstance(c, str) and choice_key(c) == choice_key(value)]
        if len(matches) == 1:
            return matches[0]
    elif value in choices:
        return value
    raise _fail(name, value, f"{what} {choices}", did_you_mean(value, choices))


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
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string"}.get(hint, getattr(
        hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    """A value as an error message shows it (plain ``str`` for :class:`Text`, which reprs the same)."""
    return repr(str(value) if isinstance(value, Text) else value)


def _fail(name: str, value: Any, expected: str, hint: str = "") -> ConfigError:
    return ConfigError(f"{name}={_shown(value)}: expected {expected}{hint}")


def coerce(name: str, value: Any, hint: Any, choices: tuple | None = None) -> Any:
    """``value`` converted to ``hint`` (bool / int / float / str / None / unions / tuples / dicts); ConfigError else.

    Strings are converted as a command line would mean them (``"3"`` -> 3 for an int, ``"off"`` -> False for a
    bool); a float with a fraction for an int, ``"flase"`` for a bool, text for a number, or a number that is not
    finite (inf, nan) are errors. With ``choices``, the canonical spelling of the choice meant is returned
    (:func:`canonical_choice`).
    """
    out = _coerce(name, value, hint)
    if choices is not None:
        out = canonical_choice(name, out, choices)
    return out


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _fail(name, value, "an int")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise _fail(name, value, "an int")
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not _NUMBER.match(text):
            raise _fail(name, value, "an int")
        if _INT.match(text.replace("_", "")):
            number = int(text)
        else:  # 1e3, 2.0: exact integers written as decimals
            try:
                exact = Decimal(text)
            except InvalidOperation:
                raise _fail(name, value, "an int") from None
            if not exact.is_finite() or exact != exact.to_integral_value() or exact.adjusted() > 19:
                raise _fail(name, value, "an int", " (a whole number)" if exact.is_finite() else "")
            number = int(exact)
    else:
        raise _fail(name, value, "an int")
    if not -_INT_LIMIT <= number < _INT_LIMIT:
        raise _fail(name, value, "an int in the 64-bit range")
    return number


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _fail(name, value, "a number")
    if isinstance(value, str):
        text = value.strip()
        if _NON_FINITE.match(text):
            raise _fail(name, value, "a finite number", " (inf and nan cannot train or select anything)")
        if not text.isascii() or not _NUMBER.match(text):
            raise _fail(name, value, "a number")
        number = float(text)
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise _fail(name, value, "a finite number") from None
    else:
        raise _fail(name, value, "a number")
    if not math.isfinite(number):
        raise _fail(name, value, "a finite number", " (inf and nan cannot train or select anything)")
    return number


def _coerce(name: str, value: Any, hint: Any) -> Any:
    if hint is Any or hint is object:
        return typed(value)
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
        return _to_int(name, value)
    if hint is float:
        return _to_float(name, value)
    if hint is str:
        if isinstance(value, str):
            return str(value)  # a Text keeps its exact characters
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
        return tuple(typed(v) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _fail(name, value, "a mapping (e.g. {key: value})")
        if len(args) == 2:
            return {_coerce(f"{name} key", k, args[0]): _coerce(f"{name}[{k!r}]", v, args[1])
                    for k, v in value.items()}
        return typed(dict(value))
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
