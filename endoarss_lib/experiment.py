"""The one public helper every notebook (and script) starts from: checked parameters -> run configs -> result rows.

``exp = Experiment("02_main_results", dataset=dataset, image_size=image_size, epochs=epochs, ...)`` checks the
parameters at once (a bad dataset, image size or epoch count fails here with a message naming the parameter), makes
the output folder, and then

* ``exp.config(model=..., weighting=..., seed=...)`` gives one :class:`~endoarss_lib.config.TrainConfig`;
* ``exp.grid(backbones=[...], archs=[...], weightings=[...])`` the named configs of a grid, with single-task
  baselines for every (backbone, seed);
* ``exp.run(configs)`` fits them (:func:`endoarss_lib.runner.run_grid`) and returns the result rows;
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
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .config import ConfigError, DEFAULT_MODEL, TrainConfig, preset
from .models.build import ModelConfig
from .results import caption, save_rows, write_table

__all__ = ["Experiment", "model_options", "project_path", "as_list", "as_mapping", "RUNS_DIR"]

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
    from .coerce import Text, coerce, read_text_yaml, typed

    def refused(why: str = "") -> ConfigError:
        example = _example(item_type)
        return ConfigError(f"{name}={value!r}: expected a list{_type_words(item_type)}{why}, e.g. {example}; with "
                           f"papermill pass -p {name} '{example}' or -y '{name}: {example}'")

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
    from .coerce import read_text_yaml, typed

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
        out = {k: v for k, v in model.to_dict().items() if k not in ("num_activities", "num_seg_classes",
                                                                       "image_size")}
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


class Experiment:
    """A notebook's experiment: its checked parameters, output folder, run configs and result tables."""

    def __init__(self, name: str, *, dataset: str = "mtlesd", data_root: str | None = None, preset_name: str = "smoke",
                 image_size: int | None = None, epochs: int | None = None, n_train: int | None = None,
                 n_test: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 seed: int = 0, device: str = "cpu", out_dir: str | os.PathLike | None = None,
                 runs_dir: str | os.PathLike = RUNS_DIR, model: str | Mapping | None = None,
                 weights: Mapping[str, str] | None = None, **fields: Any):
        self.name = name
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
        """One run config: this experiment's fields, ``model`` (label, dict or ModelConfig; default the experiment's
        model) and any other TrainConfig fields (``weighting``, ``seed``, ``cls_loss``, ...)."""
        options = model_options(model) if model is not None else dict(self.default_model)
        base = options.get("backbone", "").partition("+")[0]
        if base in self.weights and "pretrained" not in (model if isinstance(model, Mapping) else {}):
            options["pretrained"] = self.weights[base]
        try:
            return preset(self.preset_name, **{**self.fields, **fields, "model": options})
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {self._parameter_words(str(exc))}") from None

    def grid(self, backbones: Iterable, archs: Iterable[str], weightings: Iterable[str] = ("ew",),
             seeds: Iterable[int] | None = None, single_task: bool = True, model: Mapping | None = None,
             **fields) -> dict[str, TrainConfig]:
        """Named configs of a backbone x arch x weighting x seed grid (``model``: extra model options for all), plus
        a cls-only and a seg-only baseline per (backbone, seed) when ``single_task``. Each axis may be given as
        papermill passes a list parameter (:func:`as_list`: ``"[0, 1, 2]"``, ``0``, ``"0,1,2"``)."""
        backbones = as_list("backbones", backbones)
        archs = as_list("archs", archs, str)
        weightings = as_list("weightings", weightings, str)
        seeds = [self.base.seed] if seeds is None else as_list("seeds", seeds, int)
        configs: dict[str, TrainConfig] = {}
        for backbone in backbones:
            label = backbone if isinstance(backbone, str) else model_options(backbone).get("backbone")
            for seed in seeds:
                for arch in archs:
                    for weighting in weightings:
                        opts = model_options(backbone, arch=arch, **(model or {}))
                        configs[f"{label} | {arch} | {weighting} | seed {seed}"] = self.config(
                            opts, weighting=weighting, seed=seed, **fields)
                if single_task:
                    for task in ("cls", "seg"):
                        opts = model_options(backbone, arch="single", tasks=[task], **(model or {}))
                        configs[f"{label} | single {task} | seed {seed}"] = self.config(
                            opts, weighting="ew", seed=seed, **fields)
        return configs

    # -- running and reporting -------------------------------------------------------------------------------------
    def run(self, configs: Mapping[str, TrainConfig], jobs: int = 0) -> pd.DataFrame:
        """Fit every config (finished runs are reused) and return the result rows (column ``name`` first).

        ``jobs``: runs trained at once in worker processes (0: one per CPU core, or one per GPU; 1: one after the
        other in this process)."""
        from .runner import run_grid

        return run_grid(configs, jobs=jobs, progress=False)

    def note(self, rows: pd.DataFrame | None = None, extra: str = "") -> str:
        """The caption of a table of these rows: data and backbone provenance, degenerate models, ``extra``."""
        return caption(rows if rows is not None else pd.DataFrame([{"data": "synthetic" if self.base.synthetic
                                                                    else "real"}]), extra)

    def write_table(self, df: pd.DataFrame, name: str, note: str | None = None) -> tuple[Path, Path]:
        """``<out>/<name>.csv`` and ``.md`` (the full table, with its caption)."""
        return write_table(df, self.out / name, note if note is not None else self.note(df))

    def save_rows(self, rows: pd.DataFrame | Sequence[dict]) -> Path:
        """``<out>/rows.json`` (tagged with the experiment name) for the sweep's aggregation."""
        records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
        return save_rows(records, self.out, self.name)

    @property
    def data_root(self) -> Path:
        """The dataset folder the runs use (generated for synthetic data)."""
        return self.base.data_root_path()

    def datasets(self, splits=("train", "val", "test")):
        """The runs' datasets (generating the synthetic set first)."""
        from .engine import make_datasets

        return make_datasets(self.base, splits)

    def shifted_test_set(self, n_test: int | None = None):
        """The domain-shifted generalisation test set of this experiment's training dataset (MTLEndovis ->
        MTLEndovis-Gen, paper Table IV): for synthetic data generated with the same seed and size (``n_test``
        images, default the experiment's), for real data the folder ``data_root`` of the Gen set must be given to
        :func:`endoarss_lib.inference.evaluate_run_on` instead."""
        from .config import synthetic_root
        from .data import DATASETS, MTLDataset, make_synthetic

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
        return MTLDataset(root, "test", dataset=target, image_size=b.image_size, normalize=b.normalize)

    def __repr__(self) -> str:
        return f"Experiment({self.name!r}, dataset={self.base.dataset!r}, out={str(self.out)!r})"
