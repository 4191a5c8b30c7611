"""The one public helper every notebook (and script) starts from: checked parameters -> run configs -> result rows.

``exp = Experiment("02_main_results", dataset=dataset, image_size=image_size, epochs=epochs, ...)`` checks the
parameters at once (a bad dataset, image size or epoch count fails here with a message naming the parameter), makes
the output folder, and then

* ``exp.config(model=..., weighting=..., seed=...)`` gives one :class:`~endoarss_lib.config.TrainConfig` (``model``
  options are merged into the experiment's model, as ``TrainConfig.replace`` merges them);
* ``exp.variants({name: options}, seeds=[...], **fields)`` the configs of named variants x seeds and
  ``exp.grid(backbones=[...], archs=[...], weightings=[...])`` those of a grid, with single-task baselines for every
  (backbone, seed), both keyed by :class:`RunKey` (a name with its ``variant`` and ``seed``);
* ``exp.run(configs)`` fits them (:func:`endoarss_lib.training.runner.run_grid`) and returns the result rows, with
  ``variant`` and ``seed`` columns for RunKey-keyed configs (no run name is built or parsed by hand);
* ``exp.note(rows)`` is the caption every table carries (data, backbone provenance, degenerate models);
* ``exp.write_table(df, name)`` writes ``<out_dir>/<name>.csv|md`` with that caption; ``exp.save_rows(rows)``.

Model names in grids use the one model vocabulary of :class:`~endoarss_lib.models.ModelConfig`: a backbone key,
optionally ``+sma`` (``"vit_mini_patch14+sma"``), or a dict of model options.

Notebook parameters arrive as papermill passes them: ``-p seeds 0`` gives an int, ``-p seeds "[0, 1, 2]"`` a string,
``-y "seeds: [0, 1, 2]"`` a list. :func:`as_list` (and :func:`as_mapping` for dict parameters) turns each of them
into the list meant, or raises a ConfigError naming the parameter and saying how to pass it; :meth:`Experiment.grid`
applies it to its axes.
"""
from __future__ import annotations

import os
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..coerce import Text, coerce, read_text_yaml, typed
from ..config import _DERIVED_MODEL_KEYS, DEFAULT_MODEL, ConfigError, TrainConfig, _merge_model, preset, synthetic_root
from ..data import DATASETS, MTLDataset, make_synthetic
from ..evidence.claims import claims_for, claims_frame, decide, sentence
from ..evidence.scales import get_scale
from ..evidence.variants import FEATURED, FEATURED_FIELDS, FEATURED_MODEL
from ..models.build import ModelConfig
from ..training.console import show_progress
from ..training.engine import make_datasets, read_per_image
from ..training.runner import run_grid
from .results import assert_learns, caption, save_rows, summarise_seeds, write_table

__all__ = ["Experiment", "RunKey", "model_options", "project_path", "as_list", "as_mapping", "RUNS_DIR"]

RUNS_DIR = "results/runs"  # one run store for every notebook: a configuration trained once is reused everywhere


def project_path(path: str | os.PathLike) -> Path:
    """A path as the notebooks write it (relative to the repository root, e.g. ``results/02_main_results``),
    resolved the same from the repository root and from ``notebooks/`` (papermill ``--cwd notebooks``, Jupyter).

    Absolute paths are kept; a relative one is taken from the repository root when the working directory is it or
    its ``notebooks/`` folder (recognised by ``pyproject.toml`` and ``endoarss_lib/`` beside ``notebooks/``),
    else from the working directory."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    cwd = Path.cwd()
    for root in (cwd, cwd.parent):
        if (root / "notebooks").is_dir() and (root / "pyproject.toml").is_file() and (root / "endoarss_lib").is_dir():
            return root / path
    return cwd / path

def _type_words(item_type: type | None) -> str:
    return {int: " of ints", float: " of numbers", str: " of names", bool: " of true/false"}.get(item_type, "")


def _example(item_type: type | None) -> str:
    return {str: "[a, b]", float: "[0.1, 0.5]", bool: "[true, false]"}.get(item_type, "[0, 1, 2]")


def as_list(name: str, value: Any, item_type: type | None = None) -> list:
    """A notebook's list parameter as a list, however it was passed: a list or tuple; one item (``-p seeds 0`` gives
    the int 0 -> ``[0]``); or text: ``"[0, 1, 2]"`` (papermill ``-p`` passes lists as text), ``"0,1,2"``, ``"0 1 2"``
    (numbers), ``"tesla"`` -> ``["tesla"]``, ``""`` -> ``[]``. Items are converted to ``item_type`` exactly
    (``"2"`` -> 2 for ints; ``2.5`` for ints is refused); ``item_type=None`` reads text items as YAML would.
    Anything else is a ConfigError naming the parameter, what was expected and how to pass a list."""
    def refused(why: str = "") -> ConfigError:
        example = _example(item_type)
        return ConfigError(f"{name}={value!r}: expected a list{_type_words(item_type)}{why}, e.g. {example}; with "
                           f"papermill pass -y '{name}: {example}' (a YAML list; -p {name} '{example}' passes text, read the same)")

    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                parsed = read_text_yaml("[" + text[1:-1] + "]" if text.startswith("(") and text.endswith(")")
                                        else text)
            except Exception:  # noqa: BLE001 - malformed text: one clear error below
                raise refused(" (the text is not a list: check its brackets and commas)") from None
            if not isinstance(parsed, list):
                raise refused()
            items = parsed
        elif not text:
            items = []
        elif "," in text:
            items = [Text(part.strip()) for part in text.split(",")]
        elif item_type in (int, float) and len(text.split()) > 1:
            items = [Text(part) for part in text.split()]
        else:
            items = [Text(text)]
    elif value is None or isinstance(value, (dict, set)):
        raise refused()
    elif item_type is None or isinstance(value, (int, float, bool)):
        items = [value]
    else:
        raise refused()
    if any(isinstance(item, Text) and not item.strip() for item in items):
        raise refused(" (an empty item: check the commas)")
    if item_type is None:
        return [typed(item) for item in items]
    try:
        return [coerce(f"{name}[{i}]", item, item_type) for i, item in enumerate(items)]
    except ConfigError as exc:
        example = _example(item_type)
        raise ConfigError(f"{exc}; {name} expects a list{_type_words(item_type)}, e.g. {example} (papermill: -p {name} "
                          f"'{example}')") from None


def as_mapping(name: str, value: Any) -> dict:
    """A notebook's dict parameter as a dict: a mapping, ``None`` or ``""`` (-> ``{}``), or YAML / JSON text such as
    ``'{"dinov2_vitb14": "/weights/dinov2.pth"}'`` (papermill ``-p`` passes it as text); ConfigError naming the
    parameter otherwise."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            parsed = read_text_yaml(value)
        except Exception:  # noqa: BLE001 - malformed text: one clear error below
            parsed = None
        if isinstance(parsed, dict):
            return typed(parsed)
    raise ConfigError(f"{name}={value!r}: expected a mapping, e.g. {{key: value}}; with papermill pass "
                      f"-y '{name}: {{key: value}}' or -p {name} '{{\"key\": \"value\"}}'")


# notebook parameter -> TrainConfig field
_PARAMETER_FIELDS = {"n_train": "synthetic_n_train", "n_test": "synthetic_n_test", "data_seed": "synthetic_seed",
                     "preset_name": "preset"}


def model_options(model: str | Mapping | ModelConfig | None = None, **options) -> dict:
    """Model options from a label (``"dinov2_vitb14+sma"``), a dict or a ModelConfig, updated with ``options``.

    A label names the backbone (with ``+sma`` for the SMA); the bundled synthetic-pretrained weights are used for
    ``vit_mini_patch14`` unless ``pretrained`` says otherwise.
    """
    if model is None:
        out = dict(DEFAULT_MODEL)
    elif isinstance(model, ModelConfig):
        out = {k: v for k, v in model.to_dict().items() if k not in _DERIVED_MODEL_KEYS}
    elif isinstance(model, Mapping):
        out = dict(model)
    elif isinstance(model, str):
        base, _, suffix = model.partition("+")
        if suffix not in ("", "sma"):
            raise ConfigError(f"model={model!r}: expected a backbone name, optionally with '+sma'")
        out = {"backbone": base, "sma": suffix == "sma"}
        if base == DEFAULT_MODEL["backbone"]:
            out["pretrained"] = DEFAULT_MODEL["pretrained"]
    else:
        raise ConfigError(f"model={model!r}: expected a backbone label, a dict of model options or a ModelConfig")
    out.update(options)
    return out


class RunKey(str):
    """The name of one run in a set of configs, with its parts: ``key.variant`` and ``key.seed``.

    It is the string ``"<variant> | seed <seed>"`` (so ``configs["hps | seed 0"]`` and older hand-made names still
    work), and :meth:`Experiment.run` turns its parts into the rows' ``variant`` and ``seed`` columns."""

    variant: str
    seed: int

    def __new__(cls, variant: str, seed: int):
        key = super().__new__(cls, f"{variant} | seed {int(seed)}")
        key.variant, key.seed = str(variant), int(seed)
        return key

    def __reduce__(self):
        return RunKey, (self.variant, self.seed)

    def __repr__(self) -> str:
        return f"RunKey({self.variant!r}, seed={self.seed})"


_MODEL_OPTIONS = frozenset(f.name for f in dataclass_fields(ModelConfig))
_RUN_FIELDS = frozenset(f.name for f in dataclass_fields(TrainConfig)) - {"model", "seed"}


class Experiment:
    """A notebook's experiment: its checked parameters, output folder, run configs and result tables."""

    def __init__(self, name: str, *, dataset: str = "mtlesd", data_root: str | None = None, preset_name: str = "smoke",
                 image_size: int | None = None, epochs: int | None = None, n_train: int | None = None,
                 n_test: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 seed: int = 0, device: str = "cpu", out_dir: str | os.PathLike | None = None,
                 runs_dir: str | os.PathLike = RUNS_DIR, model: str | Mapping | None = None,
                 weights: Mapping[str, str] | None = None, scale: str | None = None,
                 seeds: Sequence[int] | None = None, progress: str | None = "info", **fields: Any):
        self.name = name
        if progress is not None:  # the training console in the notebook: a start line and a line per epoch
            show_progress(progress)
        self.scale = None
        if scale is not None:  # the scale fills every parameter left at None (see endoarss_lib.evidence.scales)
            try:
                self.scale = get_scale(scale)
            except ValueError as exc:
                raise ConfigError(f"{name}: bad parameter: {exc}") from None
            sc = self.scale
            image_size = sc.image_size if image_size is None else image_size
            epochs = sc.epochs if epochs is None else epochs
            n_train = sc.n_train if n_train is None else n_train
            n_test = sc.n_test if n_test is None else n_test
            fields.setdefault("patience", sc.patience)
            fields.setdefault("scheduler", sc.scheduler)
            fields.setdefault("diagnostics_every", sc.diagnostics_every)
            # a scaled experiment (every notebook) starts from the featured configuration, said once
            model = dict(FEATURED_MODEL) if model is None else model
            for key, value in FEATURED_FIELDS.items():
                fields.setdefault(key, value)
        self.seeds = list(seeds) if seeds is not None else list(self.scale.seeds if self.scale else [seed])
        self.out = project_path(out_dir if out_dir not in (None, "") else Path("results") / name)
        self.runs = project_path(runs_dir)
        self.weights = as_mapping("weights", weights)
        self.default_model = model_options(model)
        real = data_root not in (None, "")
        values = {"dataset": dataset, "data_root": str(project_path(data_root)) if real else None,
                  "synthetic": not real, "image_size": image_size, "epochs": epochs,
                  "synthetic_n_train": n_train, "synthetic_n_test": n_test, "batch_size": batch_size, "lr": lr,
                  "seed": seed, "device": device, "out_dir": str(self.runs), "progress": False, **fields}
        self.fields = {k: v for k, v in values.items() if v is not None or k == "data_root"}
        self.preset_name = preset_name
        try:
            self.base = preset(preset_name, **self.fields, model=self.default_model)
        except ConfigError as exc:
            raise ConfigError(f"{name}: bad parameter: {self._parameter_words(str(exc))}") from None
        self.out.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _parameter_words(message: str) -> str:
        for parameter, field in _PARAMETER_FIELDS.items():
            message = message.replace(f"{field}=", f"{parameter}=")
        return message

    # -- configs ---------------------------------------------------------------------------------------------------
    def config(self, model: str | Mapping | ModelConfig | None = None, **fields) -> TrainConfig:
        """One run config: this experiment's fields, ``model`` and any other TrainConfig fields (``weighting``,
        ``seed``, ``cls_loss``, ...).

        ``model``: model options merged into the experiment's model as ``TrainConfig.replace`` merges them
        (``{"arch": "hps"}`` changes the architecture only; a new ``backbone`` without ``pretrained`` drops the
        experiment's weights, which belong to its backbone), a backbone label (``"resnet_tiny"``,
        ``"dinov2_vitb14+sma"``) or a whole ModelConfig (used as it is)."""
        if model is None:
            options = dict(self.default_model)
        elif isinstance(model, ModelConfig):
            options = model_options(model)
        else:
            options = _merge_model(self.default_model, model_options(model))
        base = options.get("backbone", "").partition("+")[0]
        if base in self.weights and "pretrained" not in (model if isinstance(model, Mapping) else {}):
            options["pretrained"] = self.weights[base]
        try:
            return preset(self.preset_name, **{**self.fields, **fields, "model": options})
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {self._parameter_words(str(exc))}") from None

    def variants(self, variants: Mapping[str, Mapping | str | ModelConfig | None], seeds: Iterable[int] | None = None,
                 **fields) -> dict[RunKey, TrainConfig]:
        """Configs of named variants x seeds, keyed by :class:`RunKey` (variant, seed), in that order;
        ``exp.run(...)`` returns their rows with ``variant`` and ``seed`` columns.

        A variant's options are model options (merged into the experiment's model, as :meth:`config` does), run
        fields (``weighting``, ``select_on``, ``cls_loss``, ...) or both, told apart by name; a ``"model"`` key holds
        model options explicitly, and a label string or ModelConfig is a model. ``fields`` apply to every variant
        (a variant's own value wins); seeds come from ``seeds`` (default the experiment's seed)."""
        seeds = [self.base.seed] if seeds is None else list(seeds)
        configs: dict[RunKey, TrainConfig] = {}
        for name, options in variants.items():
            model, run_fields = self._variant_options(name, options)
            for seed in seeds:
                configs[RunKey(name, seed)] = self.config(model, **{**fields, **run_fields, "seed": seed})
        return configs

    def _variant_options(self, name: str, options) -> tuple[Any, dict]:
        """(model options, run fields) of one variant."""
        if options is None or isinstance(options, (str, ModelConfig)):
            return options, {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{self.name}: variant {name!r}: expected model options / run fields as a dict, a "
                              f"backbone label or a ModelConfig, got {type(options).__name__}")
        model, run_fields = dict(options.get("model") or {}), {}
        for key, value in options.items():
            if key == "model":
                continue
            if key == "seed":
                raise ConfigError(f"{self.name}: variant {name!r} sets seed: seeds come from variants(seeds=[...])")
            if key in _RUN_FIELDS:
                run_fields[key] = value
            elif key in _MODEL_OPTIONS:
                model[key] = value
            else:
                raise ConfigError(f"{self.name}: variant {name!r}: {key!r} is neither a model option nor a run field")
        return model, run_fields

    def grid(self, backbones: Iterable, archs: Iterable[str], weightings: Iterable[str] = ("ew",),
             seeds: Iterable[int] | None = None, single_task: bool = True, model: Mapping | None = None,
             **fields) -> dict[RunKey, TrainConfig]:
        """Configs of a backbone x arch x weighting x seed grid (``model``: extra model options for all), plus a
        single-task baseline per task of the model and (backbone, seed) when ``single_task``; keyed by
        :class:`RunKey` (variants ``"<backbone> | <arch> | <weighting>"`` and ``"<backbone> | single <task>"``).
        Each axis may be given as papermill passes a list parameter (:func:`as_list`: ``"[0, 1, 2]"``, ``0``,
        ``"0,1,2"``)."""
        backbones = as_list("backbones", backbones)
        archs = as_list("archs", archs, str)
        weightings = as_list("weightings", weightings, str)
        seeds = [self.base.seed] if seeds is None else as_list("seeds", seeds, int)
        configs: dict[RunKey, TrainConfig] = {}
        for backbone in backbones:
            label = backbone if isinstance(backbone, str) else model_options(backbone).get("backbone")
            for seed in seeds:
                for arch in archs:
                    for weighting in weightings:
                        opts = model_options(backbone, arch=arch, **(model or {}))
                        configs[RunKey(f"{label} | {arch} | {weighting}", seed)] = self.config(
                            opts, weighting=weighting, seed=seed, **fields)
                if single_task:
                    for task in self.config(model_options(backbone, **(model or {})), **fields).tasks:
                        opts = {**model_options(backbone, **(model or {})), "arch": "single", "tasks": [task]}
                        configs[RunKey(f"{label} | single {task}", seed)] = self.config(
                            opts, weighting="ew", seed=seed, **fields)
        return configs

    # -- running and reporting -------------------------------------------------------------------------------------
    def run(self, configs: Mapping[str, TrainConfig], jobs: int = 0) -> pd.DataFrame:
        """Fit every config (finished runs are reused) and return the result rows (column ``name`` first; configs
        keyed by :class:`RunKey`, as :meth:`variants` and :meth:`grid` make them, add ``variant`` and ``seed``).

        ``jobs``: runs trained at once in worker processes (0: one per CPU core, or one per GPU; 1: one after the
        other in this process)."""
        rows = run_grid(configs, jobs=jobs, progress=False)
        keys = list(configs)
        if keys and any(isinstance(k, RunKey) for k in keys):
            rows.insert(1, "variant", [k.variant if isinstance(k, RunKey) else None for k in keys])
            seeds = [k.seed if isinstance(k, RunKey) else cfg.seed for k, cfg in configs.items()]
            if "seed" in rows:
                rows.pop("seed")
            rows.insert(2, "seed", seeds)  # the configs' seeds (a failed run's row has none of its own)
        rows["name"] = [str(k) for k in keys]
        return rows

    def note(self, rows: pd.DataFrame | None = None, extra: str = "") -> str:
        """The caption of a table of these rows: the scale (TEST SCALE: not evidence), data and backbone provenance,
        degenerate models, ``extra``."""
        text = caption(rows if rows is not None else pd.DataFrame([{"data": "synthetic" if self.base.synthetic
                                                                    else "real"}]), extra)
        return f"{self.scale.caption()}; {text}" if self.scale is not None else text

    def write_table(self, df: pd.DataFrame, name: str, note: str | None = None) -> tuple[Path, Path]:
        """``<out>/<name>.csv`` and ``.md`` (the full table, with its caption)."""
        return write_table(df, self.out / name, note if note is not None else self.note(df))

    def save_rows(self, rows: pd.DataFrame | Sequence[dict]) -> Path:
        """``<out>/rows.json`` (tagged with the experiment name) for the sweep's aggregation."""
        records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
        scale = self.scale.name if self.scale is not None else "custom"
        return save_rows([{**r, "scale": scale} for r in records], self.out, self.name)

    @property
    def data_root(self) -> Path:
        """The dataset folder the runs use (generated for synthetic data)."""
        return self.base.data_root_path()

    def datasets(self, splits=("train", "val", "test")):
        """The runs' datasets (generating the synthetic set first)."""
        return make_datasets(self.base, splits)

    def shifted_test_set(self, n_test: int | None = None):
        """The domain-shifted generalisation test set of this experiment's training dataset (MTLEndovis ->
        MTLEndovis-Gen, paper Table IV): for synthetic data generated with the same seed and size (``n_test``
        images, default the experiment's), for real data the folder ``data_root`` of the Gen set must be given to
        :func:`endoarss_lib.evaluation.inference.evaluate_run_on` instead."""
        b = self.base
        target = next((name for name, spec in DATASETS.items() if spec.train_on == b.dataset), None)
        if target is None:
            raise ConfigError(f"dataset={b.dataset!r} has no generalisation set (MTLEndovis-Gen is for mtlendovis)")
        if not b.synthetic:
            raise ConfigError("shifted_test_set() generates the synthetic stand-in; for real data pass the folder "
                              "of your MTLEndovis-Gen copy to evaluate_run_on")
        n = b.synthetic_n_test if n_test is None else n_test
        root = synthetic_root(target, b.synthetic_seed, 0, n, b.image_size)
        make_synthetic(root, target, seed=b.synthetic_seed, n_train=0, n_test=n, image_size=b.image_size)
        return MTLDataset(root, "test", dataset=target, image_size=b.image_size, normalize=b.input_normalization())

    # -- claims ----------------------------------------------------------------------------------------------------
    def decide(self, rows: pd.DataFrame, claims: Sequence | None = None, by: str = "variant",
               outcomes: Mapping | None = None, values: Mapping | None = None) -> list:
        """Verdicts of ``claims`` (default: this notebook's, :func:`endoarss_lib.evidence.claims_for`) from result
        rows with a ``by`` column naming the variant and a ``seed`` column: each run's per-image test outcomes
        (``test_per_image.npz``) are read from its ``run_dir``; ``outcomes`` / ``values`` (``{(side, seed): ...}``)
        add or replace sides (other evaluations, non-image metrics). At the test scale nothing is decided. Writes
        ``<out>/claims.csv``."""
        claims = claims_for(self.name) if claims is None else claims
        own = {}
        for _, r in rows.iterrows():
            try:
                own[(r[by], int(r["seed"]))] = read_per_image(r["run_dir"])
            except Exception:  # a run without outcomes: decided on its values only
                pass
        own.update(outcomes or {})
        scale = self.scale.name if self.scale is not None else "custom"
        decides = self.scale.decides if self.scale is not None else len(self.seeds) >= 2
        names = self.base.data_spec.seg_classes  # the data the runs read (the synthetic preset names its classes)
        verdicts = []
        for claim in claims:
            sides = {claim.better, claim.worse}
            outs = {k: v for k, v in own.items() if k[0] in sides}
            vals = dict(values or {})
            if claim.per_image is False or not outs:
                key = f"test_{claim.metric}" if f"test_{claim.metric}" in rows else claim.metric
                if key in rows:
                    vals.update({(r[by], int(r["seed"])): float(r[key]) for _, r in rows.iterrows()
                                 if r[by] in sides})
            if not outs and not vals:
                continue
            verdicts.append(decide(claim, values=vals or None, outcomes=outs or None, class_names=names,
                                   scale=scale, decides=decides))
        frame = claims_frame(verdicts)
        if len(frame):
            frame.to_csv(self.out / "claims.csv", index=False)
        return verdicts

    def summary(self, rows: pd.DataFrame, metrics: Sequence[str], by: str = "variant"):
        """Mean and std over seeds of ``metrics`` per variant (in the rows' order), written to
        ``<out>/summary.csv|md`` with the caption, returned styled for the notebook."""
        table = summarise_seeds(rows, [by], list(metrics))
        note = self.note(rows, f"mean and std over seeds {sorted(set(rows['seed']))}")
        self.write_table(table, "summary", note)
        return table.style.format(precision=3, na_rep="-").set_caption(note)

    def check_learning(self, rows: pd.DataFrame, variant: str | None = None, by: str = "variant",
                       tasks: Sequence[str] | None = None) -> None:
        """Stop (AssertionError naming the seed and the task) when a run of ``variant`` (default: the featured
        configuration) does not beat the prior predictor on each of ``tasks`` (default: every task it trains): the
        notebooks call it, so a degenerate default fails their tests."""
        variant = FEATURED if variant is None else variant
        picked = rows[rows[by] == variant]
        if picked.empty:
            raise AssertionError(f"{self.name}: no run of {variant!r} to check")
        for _, row in picked.iterrows():
            assert_learns(row, f"{variant} (seed {row['seed']})", tasks=tasks)

    def show_claims(self, verdicts: Sequence):
        """The verdicts as a styled table (one row per claim), then their sentences printed: the only words a
        notebook says about a comparison."""
        frame = claims_frame(verdicts)
        for v in verdicts:
            print(sentence(v))
        return _claims_style(frame, self.note(extra="verdicts: both 95 % intervals (seeds, test images) above 0: "
                                                    "demonstrated; both below: reversed; otherwise inconclusive"))

    def show_committed_claims(self):
        """This notebook's claims as decided at the demonstration scale and committed (``make executed``)."""
        frame = self.committed_claims(self.name)
        if frame.empty:
            print("No committed demonstration verdicts for this notebook yet (`make executed` decides them).")
            return None
        return _claims_style(frame, "DEMONSTRATION SCALE, committed (results/tables/claims.csv; reproduce with "
                                    "`make executed`)")

    @staticmethod
    def committed_claims(notebook: str | None = None) -> pd.DataFrame:
        """The verdicts decided at the demonstration scale and committed (``results/tables/claims.csv``; made by
        ``make executed``), of one notebook or all; empty when none are committed."""
        path = project_path("results/tables/claims.csv")
        if not path.is_file():
            return pd.DataFrame()
        frame = pd.read_csv(path)
        return frame[frame["notebook"] == notebook].reset_index(drop=True) if notebook else frame

    def __repr__(self) -> str:
        return f"Experiment({self.name!r}, dataset={self.base.dataset!r}, out={str(self.out)!r})"


_VERDICT_COLOURS = {"demonstrated": "#cde8cd", "reversed": "#f4cccc", "inconclusive": "#eeeeee"}
_CLAIM_COLUMNS = ["statement", "source", "metric", "better", "worse", "n_seeds", "better_mean", "worse_mean",
                  "mean_difference", "interval", "verdict", "scale"]


def _claims_style(frame: pd.DataFrame, caption_text: str):
    shown = frame[[c for c in _CLAIM_COLUMNS if c in frame]]
    return (shown.style.format(precision=3, na_rep="-")
            .map(lambda v: f"background-color: {_VERDICT_COLOURS.get(v, 'white')}", subset=["verdict"])
            .set_caption(caption_text))
