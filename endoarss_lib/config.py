"""The run specification: one typed training configuration (:class:`TrainConfig`) and its presets.

A ``TrainConfig`` is checked when it is made: every field has a type (bool, int, float, str, choices) and values from
the command line or YAML are converted by it (``augment=off`` is False, ``augment=flase`` an error naming the field);
``model`` is a :class:`~endoarss_lib.models.ModelConfig` whose class counts and image size come from the dataset and
the run (an option that contradicts the data is refused); the weighting's hyper-parameters, the selection metric
and the loss weights are checked against their registries. Defaults are written once, here and in ``ModelConfig``.

Presets (:data:`PRESETS`): ``smoke`` (the fast embedded default: the project's synthetic-pretrained foundation model,
frozen, with LoRA + TESLA), ``paper`` (the paper's Sec. IV-B, field by field) and ``released`` (what the authors'
released code runs, field by field). Each preset cites its source beside every value.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .coerce import (ConfigError, DuplicateKeyError, Text, canonical_choice, check_fields, coerce, did_you_mean,
                     field_help, read_text_yaml, typed)
from .data import synthetic as _synthetic  # GENERATOR_VERSION read at call time (tests set it)
from .data.io import data_home  # noqa: F401 - where generated data go (defined in data/, re-exported here)
from .data.registry import SYNTHETIC_PRESETS, get_spec, list_datasets
from .models.architectures import ARCHITECTURES
from .models.backbones import BACKBONES, RANDOM, needs_weights, where_to_get_weights
from .models.build import CONNECTORS, TOKEN_MAPS, ModelConfig
from .models.connectors import CMOE_ROUTERS
from .models.pretrained import get_pretrained, is_pretrained_name, weights_transforms
from .tasks import TASKS, get_task, metric_info, result_keys
from .weighting import available_weightings, canonical_name, get_weighting, hparam_names

__all__ = ["TrainConfig", "PRESETS", "PRESET_SOURCES", "preset", "load_config", "apply_overrides", "parse_overrides",
           "data_home", "synthetic_root", "CUDA_NUM_WORKERS", "HASH_STABLE_DEFAULTS",
           "ConfigError", "config_help", "DEFAULT_MODEL", "DictUpdate", "require_backbone_weights"]


def synthetic_root(dataset: str, seed: int, n_train: int, n_test: int, image_size: int) -> Path:
    """Where the synthetic stand-in of ``dataset`` with these sizes lives: ``<data home>/synthetic_<dataset>_s<seed>_
    <n_train>-<n_test>_<size>px_v<generator version>`` (the one place this name is made; a new generator version gets
    new folders, so the runs on older data keep theirs)."""
    version = _synthetic.GENERATOR_VERSION
    return data_home() / f"synthetic_{dataset}_s{seed}_{n_train}-{n_test}_{image_size}px_v{version}"


def _f(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field with its help text (``--help``) and allowed values."""
    meta = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# The fast embedded default model: the project's own foundation model (a DINOv2-architecture ViT pretrained on
# synthetic images by endoarss_lib.foundation; models.list_pretrained()), frozen, with LoRA (q, v) + TESLA.
DEFAULT_MODEL = {"backbone": "vit_mini_patch14", "pretrained": "synthdino_vit_mini14", "arch": "tesla", "sma": False}

# Fields that never change a run's results (paths, workers, progress bars): left out of the results hash.
_NOT_IN_HASH = ("out_dir", "run_name", "num_workers", "progress", "stop_after_epochs", "device", "pin_memory",
                "persistent_workers", "keep_last", "data_cache", "cache_dir", "tensorboard")

# Fields added after the run store's hash was fixed, with the value every older config implicitly had: a field at that
# value is left out of the results hash, so the runs of unchanged configurations keep their folders and results
# (``TrainConfig`` fields by name, model options as ``model.<option>``). Add every new result-changing field here.
HASH_STABLE_DEFAULTS: dict[str, Any] = {
    "synthetic_generator": "1.0",  # not a field: the synthetic generator's version, for synthetic=true runs
    "patience": 0,
    "model.task_classes": {},
    "model.seg_detail_channels": 0,
    "deterministic": False,
}

# Loader defaults on CUDA (fields left null): DataLoader workers per process, so decoding and augmentation overlap the
# GPU's work.
CUDA_NUM_WORKERS = 4


@dataclass
class TrainConfig:
    """Everything a run needs (``python -m endoarss_lib.train --help`` lists every field)."""

    preset: str = _f("smoke", "the preset this config started from", choices=("smoke", "paper", "released"))
    # data
    dataset: str = _f("mtlesd", "registered dataset (with synthetic=true: its synthetic preset)")
    data_root: str | None = _f(None, "dataset folder (<root>/train|test/<activity>/image|mask); null with synthetic: "
                                     "generated under the data home")
    synthetic: bool = _f(True, "true: generate and use the synthetic stand-in of `dataset`")
    synthetic_n_train: int = _f(64, "synthetic training images (validation is carved from them)")
    synthetic_n_test: int = _f(24, "synthetic test images")
    synthetic_seed: int = _f(0, "seed of the synthetic dataset")
    image_size: int = _f(112, "model input side in pixels (a multiple of 14; of 7 too with SMA)")
    val_fraction: float = _f(0.2, "share of the training split held out for model selection")
    split_seed: int = _f(0, "seed of the stratified validation split")
    augment: bool = _f(True, "random scale-crop, flip and colour jitter on training images")
    normalize: str | None = _f(None, "input normalisation: null (what the backbone's weights expect: their record's "
                                     "mean/std, ImageNet's for DINOv2 files and random init), 'imagenet' (ImageNet "
                                     "mean/std) or 'unit' (pixels / 255 only, as the released code)",
                               choices=(None, "imagenet", "unit"))
    id_map: Any = _f(None, "raw mask value -> train id: null (the dataset's), 'identity', 'released' (raw k -> k-1) "
                           "or a mapping")
    # model
    model: ModelConfig = _f(DEFAULT_MODEL, "model options (endoarss_lib.models.ModelConfig); class counts and image "
                                           "size come from the dataset and image_size")
    # multi-task weighting (the architecture is model.arch)
    weighting: str = _f("ew", "multi-task weighting method (endoarss_lib.weighting.available_weightings())")
    weighting_hparams: dict = _f({}, "hyper-parameters of the weighting method")
    loss_weights: dict = _f({"cls": 1.0, "seg": 1.0}, "fixed weight per task loss")
    cls_loss: str = _f("ce", "activity loss: cross-entropy or MEJO's CGL", choices=("ce", "cgl"))
    cls_loss_hparams: dict = _f({}, "CGL options: p, grouping, head, tail")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy losses")
    ignore_index: int = _f(255, "mask value that no loss or metric counts")
    # optimisation
    epochs: int = _f(3, "training epochs (with patience: the most epochs)")
    patience: int = _f(0, "early stopping: stop once the selection score has not improved for this many epochs "
                          "(0: train every epoch); the selected epoch is the best one either way")
    batch_size: int = _f(8, "images per step")
    lr: float = _f(3e-3, "Adam learning rate")
    weight_decay: float = _f(0.0, "Adam weight decay (L2, as torch.optim.Adam)")
    scheduler: str = _f("none", "learning-rate schedule", choices=("none", "step", "cosine"))
    step_size: int = _f(100, "StepLR period in epochs (scheduler=step)")
    gamma: float = _f(0.5, "StepLR factor (scheduler=step)")
    grad_accum: int = _f(1, "steps whose gradients are accumulated before an optimiser step")
    # selection and evaluation
    select_metric: str = _f("score", "validation metric that selects the epoch: 'score' (mean of accuracy and mIoU) "
                                     "or a result key such as seg_miou or seg_hd95 (its direction is known)")
    select_on: str = _f("val", "split that selects the epoch: 'val' (ours) or 'test' (the released protocol: "
                               "inflates the reported numbers; for measuring that only)", choices=("val", "test"))
    eval_distances_on_val: bool = _f(False, "HD / SSIM on validation every epoch (slower); test always gets them")
    # run
    seed: int = _f(0, "seed of the model initialisation, data order and augmentation")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    amp: str = _f("auto", "bf16 autocast: auto (on CUDA), bf16, off", choices=("auto", "bf16", "off"))
    compile: bool = _f(False, "torch.compile the model")
    deterministic: bool = _f(False, "deterministic algorithms only (torch.use_deterministic_algorithms, cuBLAS workspace "
                                    ":4096:8, cuDNN benchmark off): the same run gives the same bits on the same "
                                    "machine, slower on a GPU; recorded in the result row")
    num_workers: int | None = _f(None, f"DataLoader worker processes (null: {CUDA_NUM_WORKERS} on CUDA, 0 on CPU)")
    pin_memory: bool | None = _f(None, "pinned host memory for CUDA copies (null: on CUDA)")
    persistent_workers: bool | None = _f(None, "keep DataLoader workers alive between passes (null: on CUDA with "
                                                "workers)")
    data_cache: bool | None = _f(None, "read images from a decoded, memory-mapped cache built once per dataset, split "
                                       "and size (identical results; null: on CUDA). See docs/scaling.md")
    cache_dir: str | None = _f(None, "folder of the data cache (null: <data home>/cache)")
    tensorboard: bool = _f(False, "write a TensorBoard log (losses, task weights, validation metrics, conflict) to "
                                  "<run folder>/tensorboard; needs `pip install tensorboard`")
    diagnostics_every: int = _f(0, "log task-gradient conflict every k steps (0: off)")
    out_dir: str = _f("results/runs", "folder of run folders")
    run_name: str | None = _f(None, "run folder name (null: derived from the config hash)")
    progress: bool = _f(True, "progress bars")
    stop_after_epochs: int | None = _f(None, "stop after this many epochs (simulates an interruption)")
    keep_last: bool = _f(False, "keep last.pt (the resume state, with the optimiser's) after the run has finished; "
                                "false: deleted once result.json is written (a finished run is never resumed)")

    def __post_init__(self):
        check_fields(self)
        self._canonical_names()
        self._resolve_model()
        self.validate()

    def _canonical_names(self) -> None:
        """Names that have one spelling before anything is hashed or named after them: the dataset, the weighting
        method (``DB-MTL``, ``dbmtl`` and ``db_mtl`` are all ``db_mtl``), the device and ``id_map``'s words."""
        datasets = list_datasets()
        try:
            self.dataset = canonical_choice("dataset", self.dataset, datasets)
        except ConfigError:
            raise ConfigError(f"dataset={self.dataset!r} is not registered; expected one of {datasets}"
                              f"{did_you_mean(self.dataset, datasets)}") from None

        try:
            self.weighting = canonical_name(self.weighting)
        except ValueError:
            names = [canonical_name(n) for n in available_weightings()]
            raise ConfigError(f"weighting={self.weighting!r}: expected one of {names}"
                              f"{did_you_mean(self.weighting, names)}") from None
        self.device = self.device.strip().lower()
        if isinstance(self.id_map, str):
            try:
                self.id_map = canonical_choice("id_map", self.id_map, ("identity", "released"))
            except ConfigError:
                raise ConfigError(f"id_map={self.id_map!r}: expected null, 'identity', 'released' or a mapping raw "
                                  f"-> train id{did_you_mean(self.id_map, ('identity', 'released'))}") from None

    # -- model -----------------------------------------------------------------------------------------------------
    def _resolve_model(self) -> None:
        """``model`` as a ModelConfig whose class counts and image size are the data's; contradictions refused.

        Every task's class count is read from the dataset spec through the task registry (``Task.classes_field``):
        into the model option of that name where ModelConfig has one, else into ``model.task_classes``."""
        spec = self.data_spec
        given = self.model.to_dict() if isinstance(self.model, ModelConfig) else self.model
        if not isinstance(given, dict):
            raise ConfigError(f"model={self.model!r}: expected a mapping of model options (ModelConfig fields)")
        given = dict(given)
        valid = {f.name for f in fields(ModelConfig)}
        own = {t.name: t.classes_field for t in TASKS.values() if t.classes_field in valid}
        data_values = {field_name: get_task(t).num_classes(spec) for t, field_name in own.items()}
        data_values["image_size"] = self.image_size
        for key, value in data_values.items():
            # a config file's values arrive as text (``3``): compare what they say, as the printed config wrote it
            if given.get(key) is not None and typed(given[key]) != value:
                source = "image_size" if key == "image_size" else f"dataset {self.dataset!r}"
                raise ConfigError(f"model.{key}={given[key]!r} contradicts {source} ({value}); leave it out: it is "
                                  "taken from the data and the run")
        unknown = sorted(set(given) - valid)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}{did_you_mean(unknown[0], valid)}; valid: "
                              f"{sorted(valid)}")
        given = _canonical_model_options(given)
        tasks = given.get("tasks", ModelConfig.tasks)
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        task_classes = {t: get_task(t).num_classes(spec) for t in tasks if t in TASKS and t not in own}
        for task, value in (given.get("task_classes") or {}).items():
            if task_classes.get(task) is not None and typed(value) != task_classes[task]:
                raise ConfigError(f"model.task_classes[{task!r}]={value!r} contradicts dataset {self.dataset!r} "
                                  f"({task_classes[task]}); leave it out: it is taken from the data")
        for task in tasks:
            if task in TASKS and get_task(task).num_classes(spec) is None:
                raise ConfigError(f"model.tasks={list(tasks)}: task {task!r} needs the dataset's "
                                  f"{get_task(task).classes_field}, which dataset {spec.name!r} does not declare "
                                  f"(data/registry.py)")
        given.update(data_values)
        for task, field_name in own.items():
            if task not in tasks:
                given[field_name] = None
        given["task_classes"] = task_classes
        try:
            self.model = ModelConfig(**given)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc) if str(exc).startswith("model.") else f"model: {exc}") from None

    @property
    def data_spec(self):
        """The registry spec of the data the run reads: the synthetic preset's with ``synthetic=true`` (it shares the
        real dataset's class counts), the dataset's own otherwise. Class counts come from it."""
        if self.synthetic and self.dataset in SYNTHETIC_PRESETS:
            return get_spec(SYNTHETIC_PRESETS[self.dataset])
        return self.spec

    @property
    def spec(self):
        """The dataset's registry spec."""
        try:
            return get_spec(self.dataset)
        except ValueError:
            raise ConfigError(f"dataset={self.dataset!r} is not registered; expected one of {list_datasets()}") \
                from None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.model.tasks)

    # -- checks ----------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check values and their consistency; a ConfigError names the field and what was expected."""
        checks = [("epochs", self.epochs >= 1, "an int >= 1"), ("batch_size", self.batch_size >= 1, "an int >= 1"),
                  ("lr", self.lr > 0, "> 0"), ("grad_accum", self.grad_accum >= 1, "an int >= 1"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"), ("step_size", self.step_size >= 1, ">= 1"),
                  ("gamma", self.gamma > 0, "> 0"), ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                  ("val_fraction", 0 < self.val_fraction < 1, "a fraction in (0, 1): selection needs validation"),
                  ("diagnostics_every", self.diagnostics_every >= 0, "an int >= 0"),
                  ("patience", self.patience >= 0, "an int >= 0 (0: no early stopping)"),
                  ("num_workers", self.num_workers is None or self.num_workers >= 0, "null or an int >= 0"),
                  ("synthetic_n_train", self.synthetic_n_train >= 0, "an int >= 0"),
                  ("synthetic_n_test", self.synthetic_n_test >= 1, "an int >= 1"),
                  ("synthetic_seed", self.synthetic_seed >= 0, "an int >= 0"), ("seed", self.seed >= 0, "an int >= 0"),
                  ("image_size", self.image_size >= 14, "an int >= 14")]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected {expected}")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 0:
            raise ConfigError(f"stop_after_epochs={self.stop_after_epochs!r}: expected null or an int >= 0")
        spec = self.spec
        if self.synthetic:
            if self.dataset not in SYNTHETIC_PRESETS:
                raise ConfigError(f"dataset={self.dataset!r} has no synthetic stand-in; with synthetic=true use one "
                                  f"of {sorted(SYNTHETIC_PRESETS)}, or set synthetic=false and data_root=<folder>")
            if spec.train_on is not None:
                raise ConfigError(f"dataset={self.dataset!r} is evaluation-only (no training split; a model is "
                                  f"trained on {spec.train_on!r}); train on that dataset and evaluate on this one")
        if not self.device or not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.id_map is not None and not (self.id_map in ("identity", "released") or isinstance(self.id_map, dict)):
            raise ConfigError(f"id_map={self.id_map!r}: expected null, 'identity', 'released' or a mapping raw -> "
                              "train id")
        self._check_paths()
        self._check_ignore_index(spec)
        if isinstance(self.id_map, dict):
            self._check_id_map_mapping(spec)
        if self.synthetic and self.id_map == "released":
            raise ConfigError(
                "id_map='released' (raw mask value k -> k-1, for the authors' 1-based masks) with synthetic=true: the "
                "synthetic masks are 0-based, so every class would shift by one (class 1 merged into the background, "
                "the last class never seen). Set id_map=null (the synthetic data's own ids; with --preset released "
                "add id_map=null), or train on the authors' data with synthetic=false data_root=<folder>")
        self._check_loss_weights()
        for name in ("weighting_hparams", "cls_loss_hparams"):
            _check_finite(name, getattr(self, name))
        self._check_weighting()
        self._check_cls_loss()
        self._check_select_metric()

    def _check_paths(self) -> None:
        """Folder and file fields: text that a file system can hold; run_name one name (or a few) inside out_dir."""
        for name in ("out_dir", "data_root", "cache_dir", "run_name"):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "out_dir" and not value.strip():
                raise ConfigError("out_dir='': expected a folder for the run folders (default results/runs)")
            _check_path_text(name, value)
        if self.run_name is not None:
            _check_run_name(self.run_name)

    def _check_ignore_index(self, spec) -> None:
        """ignore_index must not be a class id: pixels of that class would silently count in no loss or metric."""
        if not -2 ** 31 <= self.ignore_index < 2 ** 31:
            raise ConfigError(f"ignore_index={self.ignore_index}: expected a 32-bit int outside the class ids "
                              f"(default 255)")
        if 0 <= self.ignore_index < spec.num_seg_classes:
            name = spec.seg_classes[self.ignore_index] if self.ignore_index < len(spec.seg_classes) else "?"
            raise ConfigError(
                f"ignore_index={self.ignore_index} is the train id of class {name!r} of dataset {self.dataset!r} "
                f"(train ids 0..{spec.num_seg_classes - 1}): that class would be silently dropped from the loss and "
                f"every metric. Expected a value outside 0..{spec.num_seg_classes - 1} (default 255, the usual "
                f"'ignore' value of masks)")

    def _check_id_map_mapping(self, spec) -> None:
        """An explicit raw -> train id mapping: ints, each train id a class id or ignore_index."""
        checked = {}
        for raw, train in self.id_map.items():
            key = coerce("id_map key", raw, int)
            value = coerce(f"id_map[{key}]", train, int)
            if not (0 <= value < spec.num_seg_classes or value == self.ignore_index):
                raise ConfigError(f"id_map[{key}]={value}: expected a train id in 0..{spec.num_seg_classes - 1} of "
                                  f"dataset {self.dataset!r}, or ignore_index={self.ignore_index}")
            checked[key] = value
        self.id_map = checked

    def _check_loss_weights(self) -> None:
        """Task-loss weights: known tasks, finite, >= 0, and not all zero for the tasks the model trains."""
        TASK_NAMES = tuple(TASKS)  # the live registry (a task registered later counts)
        weights = {}
        for key, value in self.loss_weights.items():
            try:
                task = canonical_choice("loss_weights", key, TASK_NAMES)
            except ConfigError:
                raise ConfigError(f"loss_weights has unknown task(s) {[key]}{did_you_mean(key, TASK_NAMES)}; tasks: "
                                  f"{list(TASK_NAMES)} (a weight of a task the model does not train is ignored)") \
                    from None
            weights[task] = coerce(f"loss_weights.{task}", value, float)
            if weights[task] < 0:
                raise ConfigError(f"loss_weights.{task}={weights[task]!r}: expected a weight >= 0 (a negative weight "
                                  f"maximises the {task} loss instead of minimising it)")
        trained = [t for t in self.tasks if t in TASK_NAMES]
        if trained and all(weights.get(t, 1.0) == 0 for t in trained):
            raise ConfigError(f"loss_weights={weights}: every task the model trains ({trained}) has weight 0, so the "
                              f"run would train nothing and report an untrained model. Give at least one task a "
                              f"weight > 0 (e.g. loss_weights.{trained[0]}=1)")
        self.loss_weights = weights

    def _check_weighting(self) -> None:
        try:
            get_weighting(self.weighting, **self.weighting_hparams)
        except (TypeError, ValueError) as exc:
            if "unknown weighting" in str(exc):
                raise ConfigError(f"weighting={self.weighting!r}: expected one of {available_weightings()}") \
                    from None

            unknown = [k for k in self.weighting_hparams if k not in hparam_names(self.weighting)]
            hint = did_you_mean(unknown[0], hparam_names(self.weighting)) if unknown else ""
            raise ConfigError(f"weighting_hparams for {self.weighting!r}: {exc}{hint}") from None

    def _check_cls_loss(self) -> None:
        valid = ("p", "grouping", "head", "tail") if self.cls_loss == "cgl" else ()
        unknown = sorted(set(self.cls_loss_hparams) - set(valid))
        if unknown:
            raise ConfigError(f"cls_loss_hparams has unknown keys {unknown} for cls_loss={self.cls_loss!r}"
                              f"{did_you_mean(unknown[0], valid)}; valid: {list(valid)}")
        types = {"p": float, "head": float, "tail": float}
        for key, value in self.cls_loss_hparams.items():
            if key in types and (isinstance(value, (str, bool)) or value is None):  # numbers stay as given (hash)
                self.cls_loss_hparams[key] = coerce(f"cls_loss_hparams.{key}", value, types[key])
        if not 0 <= self.cls_loss_hparams.get("p", 0.0) <= 1:
            raise ConfigError(f"cls_loss_hparams.p={self.cls_loss_hparams['p']!r}: expected a probability in [0, 1] "
                              f"(MEJO: 0.1)")
        if self.cls_loss == "cgl" and self.label_smoothing:
            raise ConfigError(f"label_smoothing={self.label_smoothing!r}: expected 0 with cls_loss='cgl' (a sigmoid "
                              "BCE loss)")

    def _check_select_metric(self) -> None:
        if self.select_metric == "score":
            return
        key = self.select_metric[len("val_"):] if self.select_metric.lower().startswith("val_") else self.select_metric
        valid = result_keys(self.tasks)
        try:
            key = canonical_choice("select_metric", key, ["score", *result_keys()])
            if key == "score":
                self.select_metric = key
                return
            task, metric = metric_info(key)
        except (KeyError, ConfigError):
            raise ConfigError(f"select_metric={self.select_metric!r}: expected 'score' or one of {valid}"
                              f"{did_you_mean(key, ['score', *valid])}") from None
        if task.name not in self.tasks:
            raise ConfigError(f"select_metric={self.select_metric!r} belongs to task {task.name!r}, which this model "
                              f"does not train (tasks {list(self.tasks)}); expected 'score' or one of {valid}")
        if metric.needs_distances:
            if not self.eval_distances_on_val:
                raise ConfigError(f"select_metric={self.select_metric!r} needs boundary distances / SSIM on the "
                                  "validation split: also set eval_distances_on_val=true")
        self.select_metric = key

    # -- identity --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict (model options included), JSON-serialisable."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model"] = self.model.to_dict()
        return json.loads(json.dumps(d, default=str))

    def results_hash(self) -> str:
        """Hash of every field that can change the results (not paths, workers or progress bars). Bundled weights
        (``model.pretrained=NAME``) enter by their recorded sha256, so a new version of them makes new run folders
        instead of reusing results of the old one. A config read back from a run folder written under an older
        spelling of the same values keeps that folder's hash (:meth:`keep_recorded_hash`)."""
        return getattr(self, "_recorded_hash", None) or _results_hash(self.to_dict())

    def keep_recorded_hash(self, recorded: dict, recorded_hash: str | None) -> None:
        """For a config read back from a run folder's ``config.json`` (``recorded``, its values as written): when the
        folder's hash differs from this config's only because a value was written in an older spelling (a weighting
        alias such as ``DB-MTL``, before names had one canonical form), keep the folder's hash, so the folder's
        checkpoints still load. Nothing changes when the recorded values do not hash to ``recorded_hash``."""
        if recorded_hash and recorded_hash != self.results_hash():
            try:
                same = _results_hash(json.loads(json.dumps(recorded, default=str))) == recorded_hash
            except (KeyError, TypeError, AttributeError, ValueError):
                same = False
            if same:
                self._recorded_hash = recorded_hash

    def input_normalization(self):
        """What the data pipeline normalises inputs with: ``normalize`` when set, else what ``model.pretrained``
        expects (:func:`endoarss_lib.models.pretrained.weights_transforms`): ``"imagenet"``, ``"unit"`` or a
        ``(mean, std)`` pair."""
        if self.normalize is not None:
            return self.normalize

        return weights_transforms(self.model.pretrained, self.model.backbone).normalize

    def runtime_settings(self, cuda: bool) -> dict:
        """The loader and data-cache settings of a run on CUDA (``cuda=True``) or on the CPU: each field left null
        takes its device default (CUDA: the data cache, :data:`CUDA_NUM_WORKERS` workers, pinned memory, persistent
        workers; CPU: none of them); a value given wins. Resolved when the run starts; not in the results hash."""
        workers = self.num_workers if self.num_workers is not None else (CUDA_NUM_WORKERS if cuda else 0)
        return {"data_cache": cuda if self.data_cache is None else self.data_cache, "num_workers": workers,
                "pin_memory": cuda if self.pin_memory is None else self.pin_memory,
                "persistent_workers": (cuda and workers > 0) if self.persistent_workers is None
                else self.persistent_workers}

    def data_root_path(self) -> Path:
        """The dataset folder of this run (for synthetic data: ``<data home>/synthetic_<dataset>_s<seed>_...``)."""
        if self.data_root is not None:
            return Path(self.data_root).expanduser()
        if not self.synthetic:
            raise ConfigError("data_root=null with synthetic=false: give the folder of your prepared dataset "
                              "(data_root=/path/to/MTLESD), or set synthetic=true")
        return synthetic_root(self.dataset, self.synthetic_seed, self.synthetic_n_train, self.synthetic_n_test,
                              self.image_size)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with fields changed (``model`` may be a dict of options to update)."""
        values = self.to_dict()
        if isinstance(changes.get("model"), dict):
            changes["model"] = _merge_model(values["model"], changes["model"])
        values.update(changes)
        for key in _DERIVED_MODEL_KEYS:
            values["model"].pop(key, None)
        return TrainConfig(**values)


def _results_hash(values: dict) -> str:
    """The results hash of a config's values (:meth:`TrainConfig.to_dict`): see :meth:`TrainConfig.results_hash`."""
    data = {k: v for k, v in values.items() if k not in _NOT_IN_HASH}
    data["model"] = dict(data["model"])
    if data["model"].get("pretrained") == RANDOM:  # random init asked for by name: the same run as pretrained=False
        data["model"]["pretrained"] = False
    if data.get("synthetic") and data.get("data_root") is None:
        data["synthetic_generator"] = _synthetic.GENERATOR_VERSION  # new synthetic pixels: new run folders
    normalization = data.get("normalize")  # the normalisation used, however it was asked for
    if normalization is None:
        normalization = weights_transforms(data["model"].get("pretrained"), data["model"].get("backbone")).normalize
    data["normalize"] = normalization if isinstance(normalization, str) else [list(v) for v in normalization]
    for key, default in HASH_STABLE_DEFAULTS.items():
        if key.startswith("model."):
            if data["model"].get(key[len("model."):], default) == default:
                data["model"].pop(key[len("model."):], None)
        elif data.get(key, default) == default:
            data.pop(key, None)

    if is_pretrained_name(data["model"].get("pretrained")):
        data["pretrained_sha256"] = get_pretrained(data["model"]["pretrained"]).sha256
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------ presets
_PAPER_MODEL = {"backbone": "dinov2_vitb14", "pretrained": False, "arch": "tesla", "sma": True, "lora_rank": 4}

# Each value with its source. "paper": EndoARSS Sec. IV-B (Implementation details) and Tables II/III;
# "released": the authors' public code (gkw0010/EndoARSS: ds_train.py, create_dataset.py, LibMTL/trainer.py,
# LibMTL/config.py).
PRESET_SOURCES: dict[str, dict[str, str]] = {
    "smoke": {"*": "ours: the fast embedded default (synthetic data, the bundled synthetic-pretrained ViT, CPU)"},
    "paper": {
        "image_size": "paper Sec. IV-B: inputs resized to 224 x 224",
        "epochs": "paper Sec. IV-B: 200 epochs", "batch_size": "paper Sec. IV-B: batch size 16",
        "lr": "paper Sec. IV-B: Adam, lr 1e-4 (MTLESD) / 1e-3 (MTLEndovis)",
        "scheduler": "paper: none stated", "weight_decay": "paper: none stated",
        "augment": "paper: no augmentation stated",
        "weighting": "paper Tables II/III: the headline rows use DB-MTL (MTLESD) and STCH (MTLEndovis)",
        "model": "paper Sec. III: frozen DINOv2 ViT-B/14 + SMA + TESLA (LoRA rank 4, Table VI)",
        "normalize": "ours (the paper states none): what the weights expect (DINOv2: ImageNet mean/std)",
        "select_on": "ours (the paper states none): a validation split carved from train"},
    "released": {
        "image_size": "ds_train.py resizes to 244 and the encoder to 224: the model sees 224 (compat_ metrics are "
                      "computed at 244, as the released evaluation does)",
        "epochs": "LibMTL/config.py default used by ds_train.py: 150 epochs", "batch_size": "ds_train.py: 32",
        "lr": "ds_train.py: Adam lr 1.1e-3", "weight_decay": "ds_train.py: 1e-4",
        "scheduler": "ds_train.py: StepLR(step_size=100, gamma=0.5)",
        "augment": "create_dataset.py: the augmentation flag is never read: no augmentation",
        "normalize": "create_dataset.py: images divided by 255, no mean/std",
        "id_map": "create_dataset.py: raw mask value k >= 1 becomes k - 1",
        "weighting": "released checkpoints: DB-MTL (MTLESD) and STCH (MTLEndovis)",
        "weighting_hparams": "LibMTL STCH: nadir accumulated during epoch == warmup_epoch, switch at warmup_epoch + 1",
        "select_on": "LibMTL/trainer.py: the best epoch is chosen on the test set (no validation loader)",
        "model": "the paper model (DINOv2 + SMA + TESLA); the released *architecture* is "
                 "endoarss_lib.models.load_released_checkpoint / build_released_model"},
}

PRESETS: dict[str, dict] = {
    "smoke": dict(synthetic=True, image_size=112, epochs=3, batch_size=8, lr=3e-3, model=dict(DEFAULT_MODEL)),
    "paper": dict(synthetic=False, image_size=224, epochs=200, batch_size=16, lr=1e-4, scheduler="none",
                  weight_decay=0.0, augment=False, normalize=None, model=dict(_PAPER_MODEL),
                  weighting="db_mtl", select_on="val"),
    "released": dict(synthetic=False, image_size=224, epochs=150, batch_size=32, lr=1.1e-3,
                     scheduler="step", step_size=100, gamma=0.5, weight_decay=1e-4, augment=False, normalize="unit",
                     id_map="released", model=dict(_PAPER_MODEL), weighting="db_mtl", select_on="test"),
}
# Values that follow the dataset: (preset, field) -> {dataset: value}.
_BY_DATASET = {("paper", "lr"): {"mtlesd": 1e-4, "mtlendovis": 1e-3},
               ("paper", "weighting"): {"mtlesd": "db_mtl", "mtlendovis": "stch"},
               ("released", "weighting"): {"mtlesd": "db_mtl", "mtlendovis": "stch"}}
_RELEASED_STCH = {"warmup_convention": "libmtl"}


def _merge_model(base: dict, changes: dict) -> dict:
    """Model options updated by ``changes``; the base's ``pretrained`` weights go with its backbone, so changing the
    backbone without naming weights does not carry weights of another backbone over."""
    out = {**base, **changes}
    if "backbone" in changes and changes["backbone"] != base.get("backbone") and "pretrained" not in changes:
        out.pop("pretrained", None)
    return out


# Other tools' names for our fields (timm, Lightning, Hydra habits), for "did you mean" (keys as choice_key makes them).
FIELD_SYNONYMS = {"learningrate": "lr", "lrate": "lr", "numepochs": "epochs", "maxepochs": "epochs",
                  "nepochs": "epochs", "epoch": "epochs", "bs": "batch_size", "batch": "batch_size",
                  "wd": "weight_decay", "output": "out_dir", "outputdir": "out_dir", "out": "out_dir",
                  "logdir": "out_dir", "data": "data_root", "datadir": "data_root", "root": "data_root",
                  "datapath": "data_root", "name": "run_name", "experimentname": "run_name", "expname": "run_name",
                  "gpu": "device", "accelerator": "device", "precision": "amp", "lrscheduler": "scheduler",
                  "schedule": "scheduler", "workers": "num_workers", "imgsize": "image_size", "size": "image_size",
                  "inputsize": "image_size", "arch": "model", "backbone": "model", "pretrained": "model",
                  "weightingmethod": "weighting", "mtlweighting": "weighting", "randomseed": "seed"}


class DictUpdate(dict):
    """Entries of a mapping field set one by one (``loss_weights.cls=2``): they update the field's value (the
    preset's, the file's or the default) instead of replacing it."""


def _field_default(name: str) -> Any:
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


def _same_or_canonical(kind: str, value: Any) -> Any:
    """The canonical spelling of a dataset or weighting name where it has one (the value itself otherwise: the
    config's own checks report it)."""
    if not isinstance(value, str):
        return value
    try:
        if kind == "dataset":
            return canonical_choice("dataset", value, list_datasets())

        return canonical_name(value)
    except ValueError:
        return value


def _follow_dataset(name: str, values: dict, given: dict) -> None:
    """A preset's values that follow the dataset (the paper's lr, the headline weighting), unless ``given``."""
    dataset = _same_or_canonical("dataset", values.get("dataset", "mtlesd"))
    for (pname, key), by in _BY_DATASET.items():
        if pname == name and key not in given and dataset in by:
            values[key] = by[dataset]


def preset(name: str, **overrides) -> TrainConfig:
    """A config from a preset, with field overrides; values that follow the dataset (the paper's lr, the headline
    weighting) follow the ``dataset`` given, unless overridden. A :class:`DictUpdate` value updates the preset's (or
    the default) mapping of its field."""
    name = canonical_choice("preset", name, sorted(PRESETS))
    if "model" in overrides and isinstance(overrides["model"], ModelConfig):
        overrides = {**overrides, "model": overrides["model"].to_dict()}
    if "model" in overrides and not isinstance(overrides["model"], dict):
        raise ConfigError(f"model={overrides['model']!r}: expected a mapping of model options, e.g. model.arch=hps "
                          f"or model={{arch: hps, backbone: vit_mini_patch14}}")
    updates = {k: v for k, v in overrides.items() if isinstance(v, DictUpdate)}
    overrides = {k: v for k, v in overrides.items() if k not in updates}
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        names = [f.name for f in fields(TrainConfig)]
        hint = did_you_mean(unknown[0], names, synonyms=FIELD_SYNONYMS)
        raise ConfigError(f"unknown config field(s) {unknown}{hint}; see `python -m endoarss_lib.train --help`")
    values = {**PRESETS[name], **overrides, "preset": name}
    _follow_dataset(name, values, overrides)
    if (name == "released" and _same_or_canonical("weighting", values.get("weighting")) == "stch"
            and "weighting_hparams" not in overrides):
        values["weighting_hparams"] = dict(_RELEASED_STCH)
    values["model"] = _merge_model(PRESETS[name]["model"], overrides.get("model", {}))
    for key, update in updates.items():
        base = values[key] if key in values else _field_default(key)
        values[key] = {**(base if isinstance(base, dict) else {}), **update}
    return TrainConfig(**values)


_DERIVED_MODEL_KEYS = ("num_activities", "num_seg_classes", "task_classes", "image_size")  # from the data and run
# Model options whose values are names from a registry: matched ignoring case, '-' and '_', stored canonically.
_MODEL_NAME_OPTIONS = ("backbone", "arch", "connector", "cmoe_router", "token_map", "tesla_alpha")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on"), ("false", "no", "off", "none", "null", "~", "")


def _model_choices() -> dict[str, tuple]:
    return {"backbone": tuple(BACKBONES), "arch": tuple(ARCHITECTURES),
            "connector": tuple(c for c in CONNECTORS if c is not None), "cmoe_router": tuple(CMOE_ROUTERS),
            "token_map": tuple(TOKEN_MAPS), "tesla_alpha": ("onehot", "soft")}


def _pretrained_value(value: Any) -> Any:
    """``model.pretrained`` as the user meant it: true/false words as booleans, ``random`` (any case) as
    :data:`~endoarss_lib.models.backbones.RANDOM` (random init asked for explicitly; hashed as False), any other text
    as a bundled weight name or a path (kept as written, ``~`` expanded; ``0x10`` stays ``'0x10'``; a file named
    ``random`` is ``./random``)."""
    if not isinstance(value, str):
        return value
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    if word == RANDOM:
        return RANDOM
    _check_path_text("model.pretrained", value)
    return os.path.expanduser(str(value)) if value.startswith("~") else str(value)


def require_backbone_weights(cfg: TrainConfig) -> None:
    """Refuse to start a run whose frozen DINOv2 backbone has no weights (``model.pretrained`` false or unset, as in
    the ``paper`` and ``released`` presets): it would train for ``epochs`` epochs on a randomly initialised backbone
    and report numbers that mean nothing about DINOv2. A ConfigError names the file to get, its official source, its
    sha256 where known and the override to use; ``model.pretrained=random`` asks for random init explicitly (an
    ablation) and passes. Called when a run starts (``python -m endoarss_lib.train``), not when a config is made, so
    ``--print-config`` and configs made in code still work."""
    model = cfg.model
    if not needs_weights(model.backbone, model.pretrained):
        return
    what = f"preset {cfg.preset!r}" if cfg.preset in ("paper", "released") else "this config"
    raise ConfigError(
        f"model.pretrained is not set: {what} would train a frozen, RANDOMLY INITIALISED {model.backbone} backbone for "
        f"{cfg.epochs} epochs, whose results mean nothing about DINOv2. To use the published weights, "
        f"{where_to_get_weights(model.backbone)}. To train on a random frozen backbone on purpose (an ablation), "
        f"write model.pretrained={RANDOM}")


def _canonical_model_options(given: dict) -> dict:
    """Model options with registry names in their one spelling (``model.arch=DSelect-K`` -> ``dselect_k``), task
    names checked, and ``pretrained`` read as text (:func:`_pretrained_value`)."""
    TASK_NAMES = tuple(TASKS)  # the live registry (a task registered later counts)
    out = dict(given)
    choices = _model_choices()
    for key in _MODEL_NAME_OPTIONS:
        value = out.get(key)
        if key == "connector" and (value is None or (isinstance(value, str) and value.strip().lower()
                                                      in ("none", "null", "~", ""))):
            if key in out:
                out[key] = None
            continue
        if isinstance(value, str):
            out[key] = canonical_choice(f"model.{key}", value, choices[key])
    tasks = out.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(tasks, (list, tuple)):
        out["tasks"] = tuple(canonical_choice("model.tasks", t, TASK_NAMES) if isinstance(t, str) else t
                             for t in tasks)
    for key in ("out_layers", "seg_rates"):  # lists of ints (block indices, ASPP rates)
        value = out.get(key)
        if isinstance(value, (list, tuple)):
            out[key] = tuple(coerce(f"model.{key}[{i}]", v, int) for i, v in enumerate(value))
    if "pretrained" in out:
        out["pretrained"] = _pretrained_value(out["pretrained"])
    return out


def _check_finite(name: str, value: Any) -> None:
    """Every number inside ``value`` (a mapping of hyper-parameters) is finite."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(f"{name}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(f"{name}[{i}]", v)
    elif (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("inf", "infinity", "nan")):
        raise ConfigError(f"{name}={value!r}: expected a finite number (inf and nan cannot train or select anything)")


_NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows)


def _check_path_text(name: str, value: str) -> None:
    """Text that names a file or folder: valid UTF-8, no control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ConfigError(f"{name}={shown!r}: not valid UTF-8 text (a name in another encoding?); expected a UTF-8 "
                          f"path: rename the file or folder, or give its UTF-8 name") from None
    bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(f"{name}={value!r}: contains control characters {bad}; expected a file or folder name")


def _check_run_name(value: str) -> None:
    """run_name: a folder name inside out_dir (or a few, separated by '/'), each at most 255 bytes."""
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":"):
        raise ConfigError(f"run_name={value!r}: expected a folder name inside out_dir, not an absolute path; give "
                          f"the parent folder as out_dir and the last name as run_name")
    for part in parts:
        if part in ("", ".", ".."):
            raise ConfigError(f"run_name={value!r}: expected a folder name inside out_dir ('{part}' is not one: "
                              f"empty names, '.' and '..' would leave or merge run folders)")
        size = len(part.encode("utf-8"))
        if size > _NAME_MAX:
            raise ConfigError(f"run_name={value[:40]!r}... is {size} bytes long: a folder name holds at most "
                              f"{_NAME_MAX} bytes; choose a shorter run_name (or leave it null: the run folder is "
                              f"then named after the config)")


def _text_hint(hint: Any) -> bool:
    """Whether a field holds text (``str`` or ``str | None``): its command-line value is kept exactly as typed."""
    if hint is str:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    return origin in (typing.Union, types.UnionType) and set(args) == {str, type(None)}


def _value(hint: Any, text: str, where: str) -> Any:
    """A command-line value for a field of type ``hint``: text fields keep the exact text; other values are read as
    YAML flow syntax (``[1, 2]``, ``{cls: 1}``) with every plain scalar kept as text for the field to type."""
    if _text_hint(hint):
        return Text(text)
    try:
        return read_text_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {where!r}: {exc}") from None
    except yaml.YAMLError:
        return Text(text)


def _dict_fields(hints: dict) -> list[str]:
    return [n for n, h in hints.items() if h is dict or typing.get_origin(h) is dict]


def _set_key(out: dict, key: str, raw: Any, where: str, hints: dict, from_text: bool) -> None:
    """Set ``key`` (``field``, ``model.<option>`` or ``<mapping field>.<entry>``) in ``out``; ``raw`` is the
    command-line text (``from_text``) or a value already read from YAML."""
    names = list(hints)
    top, _, rest = key.partition(".")
    if top == "preset" and from_text:
        raise ConfigError(f"override {where!r}: the preset is chosen with --preset NAME (or `preset: NAME` first in a "
                          f"config file); as an override it would only relabel the config, not change its values")
    if top not in hints:
        raise ConfigError(f"override {where!r}: unknown config field {top!r}"
                          f"{did_you_mean(top, names, synonyms=FIELD_SYNONYMS)}; see `python -m endoarss_lib.train "
                          f"--help`")
    if not rest:
        out[top] = _value(hints[top], raw, where) if from_text else raw
        return
    if top == "model":
        options = typing.get_type_hints(ModelConfig)
        if rest not in options:
            raise ConfigError(f"override {where!r}: unknown model option {rest!r}{did_you_mean(rest, options)}; "
                              f"see `python -m endoarss_lib.train --help`")
        hint = str if rest == "pretrained" else options[rest]  # pretrained: a name or a path, typed by its text
        model = out.setdefault("model", {})
        model[rest] = _value(hint, raw, where) if from_text else raw
        return
    mappings = _dict_fields(hints)
    if top not in mappings or "." in rest:
        raise ConfigError(f"override {where!r}: {top!r} is not a mapping field; a dotted key sets one entry of "
                          f"{sorted(mappings)} (e.g. loss_weights.cls=2) or a model option (model.arch=hps)")
    entries = out.get(top)
    if not isinstance(entries, dict):
        entries = out[top] = DictUpdate()
    entries[rest] = _value(Any, raw, where) if from_text else raw


def parse_overrides(items) -> dict:
    """``["epochs=5", "model.arch=hps", "amp=off"]`` -> ``{"epochs": 5, "model": {"arch": "hps"}, "amp": "off"}``.

    Values are typed by their field: text fields keep the exact text (``run_name=007`` is ``'007'``), numbers and
    booleans are converted by the field (``epochs=1e3`` is 1000), mappings take dotted keys
    (``loss_weights.cls=2`` updates one entry). Unknown fields and options are errors with the closest names; a key
    given twice is an error (the second would silently win).
    """
    hints = typing.get_type_hints(TrainConfig)
    out: dict = {}
    seen: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            key = item.strip()
            hint = (f"; did you mean {key}=<value>?" if key in hints or key.partition(".")[0] in hints else
                    did_you_mean(key, hints))
            raise ConfigError(f"override {item!r}: expected key=value{hint}")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(f"override {item!r}: {key!r} is given twice on the command line (first as "
                              f"{seen[key]!r}); give it once")
        seen[key] = item
        _set_key(out, key, text, item, hints, from_text=True)
    return out


def _expand_file_keys(data: dict, path: Path) -> dict:
    """A config file's top-level mapping with dotted keys (``loss_weights.cls: 2``, ``model.arch: hps``) set like
    the command line's; unknown fields are left for :func:`preset` to report (with the closest names)."""
    hints = typing.get_type_hints(TrainConfig)
    out: dict = {}
    for key, value in data.items():
        key = str(key)
        if "." in key:
            _set_key(out, key, value, f"{key}: ... in {path}", hints, from_text=False)
        elif key == "model" and isinstance(out.get("model"), dict) and isinstance(value, dict):
            out["model"] = {**value, **out["model"]}
        else:
            out[key] = value
    return out


def _merge(base: dict, changes: dict) -> dict:
    out = {**base, **changes}
    if "model" in changes and isinstance(changes["model"], dict):
        out["model"] = _merge_model(base.get("model", {}), changes["model"])
    for key, value in changes.items():
        if isinstance(value, DictUpdate) and isinstance(base.get(key), dict):
            out[key] = (DictUpdate if isinstance(base[key], DictUpdate) else dict)({**base[key], **value})
    return out


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings to a config (values typed by their field; ``model.arch=hps`` sets a model option,
    ``loss_weights.cls=2`` one entry of a mapping).

    A preset's dataset-dependent values (the paper's lr, the headline weighting) follow a ``dataset=`` override
    unless they are overridden too.
    """
    changes = parse_overrides(overrides)
    base = config.to_dict()
    base["model"] = {k: v for k, v in base["model"].items() if k not in _DERIVED_MODEL_KEYS}
    values = _merge(base, changes)
    if "dataset" in changes and config.preset in PRESETS:
        _follow_dataset(config.preset, values, changes)
    return TrainConfig(**values)


def load_config(path: str | Path | None = None, overrides: list[str] = (), preset_name: str = "smoke"
                ) -> TrainConfig:
    """A config from a YAML file (``preset: <name>`` first, then fields) or a preset, then ``key=value`` overrides.

    File values and overrides are merged first and the config is made once, so a field can be completed by an
    override (``--preset paper data_root=/data/MTLESD``) and dataset-dependent preset values follow the final
    ``dataset``. The file's values are typed like the command line's (a text field keeps ``007``); a key given twice
    in the file is an error naming the key and its lines."""
    data: dict = {}
    recorded_hash = None
    if path is not None:
        path = Path(path).expanduser()
        try:
            data = read_text_yaml(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder; expected a YAML config file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a YAML config "
                              f"file") from None
        except DuplicateKeyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        data = {str(k): v for k, v in data.items()}
        recorded_hash = data.pop("config_hash", None)  # a run folder's config.json: the hash of the run it made
        preset_name = data.pop("preset", preset_name)
        try:
            data = _expand_file_keys(data, path)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    values = _merge(data, parse_overrides(overrides))
    try:
        cfg = preset(preset_name, **values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    if recorded_hash is not None and not overrides and str(recorded_hash) != cfg.results_hash():
        warnings.warn(f"{path}: written for the run {recorded_hash}, but it resolves to {cfg.results_hash()} (the "
                      "file was edited, or written by another version): training makes a new run folder, not that "
                      "run's", stacklevel=2)
    return cfg


def config_help() -> str:
    """Every TrainConfig field and model option with its type, default and meaning (the CLI's ``--help``)."""
    lines = ["run fields (key=value):"]
    for name, kind, default, meaning in field_help(TrainConfig):
        lines.append(f"  {name:<24} {kind:<28} default {default:<14} {meaning}")
    lines.append("  (a mapping field takes one entry as <field>.<key>=value, e.g. loss_weights.cls=2 or "
                 "weighting_hparams.beta=0.5)")
    lines.append("model options (model.<option>=value):")
    for name, kind, default, meaning in field_help(ModelConfig):
        lines.append(f"  {name:<24} {kind:<28} default {default:<14} {meaning}")
    return "\n".join(lines)
