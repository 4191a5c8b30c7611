"""Property-based tests (Hypothesis) of the override parser and the config types (issue 21).

For every kind of field: any text either converts exactly (checked against an independent reading: ``Fraction`` for
numbers, the word lists for booleans, the choice list for choices) or is refused with a ConfigError that names the
field; text fields give back exactly the text that was typed, on the command line and in YAML files. Each property
also has its completeness side: values that are valid must be accepted (a parser that refused everything would
otherwise pass).
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from endoarss_lib.coerce import NULL_WORDS, choice_key, read_text_yaml  # noqa: E402
from endoarss_lib.config import ConfigError, apply_overrides, load_config, preset  # noqa: E402

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = preset("smoke")

TEXT_FIELDS = {"run_name": True, "data_root": True, "cache_dir": True, "out_dir": False}  # field -> may be null
INT_FIELDS = {"epochs": 1, "batch_size": 1, "seed": 0, "synthetic_seed": 0, "grad_accum": 1, "step_size": 1,
              "diagnostics_every": 0}  # field -> smallest valid value
FLOAT_FIELDS = {"lr": lambda v: v > 0, "weight_decay": lambda v: v >= 0, "gamma": lambda v: v > 0,
                "label_smoothing": lambda v: 0 <= v < 1, "val_fraction": lambda v: 0 < v < 1}
BOOL_FIELDS = ("augment", "synthetic", "compile", "progress", "keep_last", "eval_distances_on_val")
CHOICE_FIELDS = {"amp": ("auto", "bf16", "off"), "scheduler": ("none", "step", "cosine"),
                 "normalize": ("imagenet", "unit"), "select_on": ("val", "test"), "cls_loss": ("ce", "cgl"),
                 "weighting": ("ew", "db_mtl", "aligned_mtl", "moco", "stch", "gm_coord")}
NULLABLE_CHOICES = {"normalize"}
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "on", "y", "1"}, {"false", "no", "off", "n", "0"}
_SIMPLE_NUMBER = re.compile(r"\A[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")

# Text a user may type: any characters (surrogates excluded: they cannot come from a UTF-8 command line).
typed_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
number_like = st.one_of(
    st.integers(-10 ** 25, 10 ** 25).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.from_regex(r"\A[-+]?[0-9_]{0,8}(\.[0-9_]{0,4})?([eE][-+]?[0-9]{1,3})?\Z"),
    st.from_regex(r"\A0[xob][0-9a-f]{1,4}\Z"), st.sampled_from(["inf", "-inf", "nan", ".inf", "1/3", "12:30", " 7 "]),
    typed_text.map(lambda t: t[:8]))


def override(field: str, text: str):
    """The config after ``field=text`` on the command line, or the ConfigError it raised."""
    try:
        return apply_overrides(BASE, [f"{field}={text}"])
    except ConfigError as exc:
        return exc


def refused_naming(result, field: str) -> bool:
    return isinstance(result, ConfigError) and field in str(result)


def exact(text: str) -> Fraction | None:
    """The exact value of decimal text (an independent reading: Fraction, not the parser's own code)."""
    clean = text.strip().replace("_", "")
    if not _SIMPLE_NUMBER.match(clean):
        return None
    return Fraction(clean)


@SETTINGS
@given(field=st.sampled_from(sorted(TEXT_FIELDS)), text=typed_text)
def test_any_text_for_a_text_field_comes_back_unchanged_or_is_refused_naming_the_field(field, text):
    result = override(field, text)
    if isinstance(result, ConfigError):
        assert field in str(result)
        return
    value = getattr(result, field)
    if TEXT_FIELDS[field] and text.strip().lower() in NULL_WORDS:
        assert value is None
    else:
        assert value == text and type(value) is str


@SETTINGS
@given(field=st.sampled_from(sorted(TEXT_FIELDS)),
       text=st.from_regex(r"\A[0-9A-Za-z_][0-9A-Za-z_:.+\-]{0,15}\Z"))
def test_a_plain_yaml_scalar_in_a_text_field_keeps_its_characters(field, text, tmp_path_factory):
    try:
        plain = isinstance(read_text_yaml(f"k: {text}")["k"], str)  # a plain scalar of YAML (not a mapping)
    except yaml.YAMLError:
        plain = False
    assume(plain)
    path = tmp_path_factory.mktemp("yaml") / "run.yaml"
    path.write_text(f"preset: smoke\n{field}: {text}\n")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert field in str(exc) and str(path) in str(exc)
        return
    value = getattr(cfg, field)
    assert value is None if (TEXT_FIELDS[field] and text.lower() in NULL_WORDS) else value == text


@SETTINGS
@given(field=st.sampled_from(sorted(INT_FIELDS)), text=number_like)
def test_int_fields_convert_exactly_or_refuse_naming_the_field(field, text):
    result = override(field, text)
    if isinstance(result, ConfigError):
        assert field in str(result)
        return
    value = getattr(result, field)
    assert type(value) is int and exact(text) == value and value >= INT_FIELDS[field]


@SETTINGS
@given(field=st.sampled_from(sorted(INT_FIELDS)), value=st.integers(0, 2 ** 63 - 1), spelling=st.integers(0, 2))
def test_valid_ints_are_accepted_however_spelled(field, value, spelling):
    assume(value >= INT_FIELDS[field])
    text = [str(value), f"+{value}", f"{value}.0"][spelling]
    assert getattr(override(field, text), field) == value


@SETTINGS
@given(field=st.sampled_from(sorted(FLOAT_FIELDS)), text=number_like)
def test_float_fields_convert_exactly_or_refuse_naming_the_field(field, text):
    result = override(field, text)
    if isinstance(result, ConfigError):
        assert field in str(result)
        return
    value = getattr(result, field)
    assert type(value) is float and math.isfinite(value) and FLOAT_FIELDS[field](value)
    assert exact(text) is not None and value == float(exact(text))  # float(Fraction) rounds correctly


@SETTINGS
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_a_learning_rate_from_python_is_kept_or_refused(value):
    try:
        cfg = preset("smoke", lr=value)
    except ConfigError as exc:
        assert "lr=" in str(exc) and not (math.isfinite(value) and value > 0)
        return
    assert cfg.lr == value and math.isfinite(value) and value > 0
    assert override("lr", repr(value)).lr == value  # the same number typed on the command line


@SETTINGS
@given(field=st.sampled_from(BOOL_FIELDS),
       text=st.one_of(st.sampled_from(sorted(TRUE_WORDS | FALSE_WORDS | {"flase", "2", "True", "OFF", " yes "})),
                      typed_text.map(lambda t: t[:6])))
def test_bool_fields_take_exactly_the_documented_words(field, text):
    result = override(field, text)
    word = text.strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        assert getattr(result, field) is (word in TRUE_WORDS)
    else:
        assert refused_naming(result, field)


def _mangled(choice: str):
    """Spellings of ``choice`` that mean it: any letter case, '_' written as '-', ' ', '' or '_'."""
    parts = choice.split("_")
    return st.tuples(st.lists(st.sampled_from(["_", "-", "", " "]), min_size=len(parts) - 1,
                              max_size=len(parts) - 1),
                     st.lists(st.booleans(), min_size=len(choice), max_size=len(choice))).map(
        lambda seps_cases: "".join(
            c.upper() if up else c for c, up in zip(
                parts[0] + "".join(sep + part for sep, part in zip(seps_cases[0], parts[1:])), seps_cases[1])))


@SETTINGS
@given(data=st.data(), field=st.sampled_from(sorted(CHOICE_FIELDS)))
def test_choices_are_matched_ignoring_case_and_separators_and_stored_canonically(data, field):
    choice = data.draw(st.sampled_from(CHOICE_FIELDS[field]))
    spelled = data.draw(_mangled(choice))
    cfg = override(field, spelled)
    assert getattr(cfg, field) == choice
    assert cfg.results_hash() == override(field, choice).results_hash()


@SETTINGS
@given(field=st.sampled_from(sorted(CHOICE_FIELDS)), text=typed_text.map(lambda t: t[:12]))
def test_any_other_choice_text_is_refused_naming_the_field(field, text):
    result = override(field, text)
    if isinstance(result, ConfigError):
        assert field in str(result)
    elif getattr(result, field) is None:  # a nullable choice (normalize: null = what the weights expect)
        assert field in NULLABLE_CHOICES and text.strip().lower() in ("", "null", "none", "~")
    else:
        assert choice_key(getattr(result, field)) == choice_key(text)


@SETTINGS
@given(task=st.sampled_from(["cls", "seg"]), text=number_like)
def test_one_loss_weight_converts_exactly_or_is_refused_naming_it(task, text):
    result = override(f"loss_weights.{task}", text)
    if isinstance(result, ConfigError):
        assert "loss_weights" in str(result)
        return
    value = result.loss_weights[task]
    assert exact(text) is not None and value == float(exact(text)) and math.isfinite(value) and value >= 0
    other = "seg" if task == "cls" else "cls"
    assert result.loss_weights[other] == 1.0  # the other entry keeps its value


@SETTINGS
@given(text=number_like)
def test_an_optional_int_is_null_an_exact_int_or_refused(text):
    result = override("num_workers", text)
    if isinstance(result, ConfigError):
        assert "num_workers" in str(result)
    elif text.strip().lower() in NULL_WORDS:
        assert result.num_workers is None
    else:
        assert exact(text) == result.num_workers and result.num_workers >= 0
