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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .coerce import ConfigError, YAMLLoader, check_fields, coerce, field_help, parse_text
from .data.io import data_home  # noqa: F401 - where generated data go (defined in data/, re-exported here)
from .data.registry import get_spec, list_datasets
from .models.build import ModelConfig

__all__ = ["TrainConfig", "PRESETS", "PRESET_SOURCES", "preset", "load_config", "apply_overrides", "parse_overrides",
           "data_home", "synthetic_root", "CUDA_NUM_WORKERS", "HASH_STABLE_DEFAULTS",
           "ConfigError", "config_help", "DEFAULT_MODEL"]


def synthetic_root(dataset: str, seed: int, n_train: int, n_test: int, image_size: int) -> Path:
    """Where the synthetic stand-in of ``dataset`` with these sizes lives: ``<data home>/synthetic_<dataset>_s<seed>_
    <n_train>-<n_test>_<size>px_v<generator version>`` (the one place this name is made; a new generator version gets
    new folders, so the runs on older data keep theirs)."""
    from .data.synthetic import GENERATOR_VERSION

    return data_home() / f"synthetic_{dataset}_s{seed}_{n_train}-{n_test}_{image_size}px_v{GENERATOR_VERSION}"


def _f(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field with its help text (``--help``) and allowed values."""
    meta = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# The fast embedded default model: the project's own foundation model (a DINOv2-architecture ViT pretrained on
# synthetic images by endoarss_lib.pretrain; models.list_pretrained()), frozen, with LoRA (q, v) + TESLA.
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
        self._resolve_model()
        self.validate()

    # -- model -----------------------------------------------------------------------------------------------------
    def _resolve_model(self) -> None:
        """``model`` as a ModelConfig whose class counts and image size are the data's; contradictions refused.

        Every task's class count is read from the dataset spec through the task registry (``Task.classes_field``):
        into the model option of that name where ModelConfig has one, else into ``model.task_classes``."""
        from .tasks import TASKS, get_task

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
            if given.get(key) is not None and given[key] != value:
                source = "image_size" if key == "image_size" else f"dataset {self.dataset!r}"
                raise ConfigError(f"model.{key}={given[key]!r} contradicts {source} ({value}); leave it out: it is "
                                  "taken from the data and the run")
        unknown = sorted(set(given) - valid)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; valid: {sorted(valid)}")
        tasks = given.get("tasks", ModelConfig.tasks)
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        task_classes = {t: get_task(t).num_classes(spec) for t in tasks if t in TASKS and t not in own}
        for task, value in (given.get("task_classes") or {}).items():
            if task_classes.get(task) is not None and value != task_classes[task]:
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
        from .data.registry import SYNTHETIC_PRESETS

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
            from .data.registry import SYNTHETIC_PRESETS

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
        from .tasks import TASKS

        unknown = set(self.loss_weights) - set(TASKS)
        if unknown:
            raise ConfigError(f"loss_weights has unknown task(s) {sorted(unknown)}; tasks: {list(TASKS)} (a "
                              "weight of a task the model does not train is ignored)")
        self.loss_weights = {k: coerce(f"loss_weights[{k!r}]", v, float) for k, v in self.loss_weights.items()}
        self._check_weighting()
        self._check_cls_loss()
        self._check_select_metric()

    def _check_weighting(self) -> None:
        from .weighting import available_weightings, get_weighting

        try:
            get_weighting(self.weighting, **self.weighting_hparams)
        except (TypeError, ValueError) as exc:
            if "unknown weighting" in str(exc):
                raise ConfigError(f"weighting={self.weighting!r}: expected one of {available_weightings()}") \
                    from None
            raise ConfigError(f"weighting_hparams for {self.weighting!r}: {exc}") from None

    def _check_cls_loss(self) -> None:
        valid = ("p", "grouping", "head", "tail") if self.cls_loss == "cgl" else ()
        unknown = sorted(set(self.cls_loss_hparams) - set(valid))
        if unknown:
            raise ConfigError(f"cls_loss_hparams has unknown keys {unknown} for cls_loss={self.cls_loss!r}; "
                              f"valid: {list(valid)}")
        if self.cls_loss == "cgl" and self.label_smoothing:
            raise ConfigError(f"label_smoothing={self.label_smoothing!r}: expected 0 with cls_loss='cgl' (a sigmoid "
                              "BCE loss)")

    def _check_select_metric(self) -> None:
        from .tasks import metric_info, result_keys

        if self.select_metric == "score":
            return
        key = self.select_metric[len("val_"):] if self.select_metric.startswith("val_") else self.select_metric
        valid = result_keys(self.tasks)
        try:
            task, metric = metric_info(key)
        except KeyError:
            raise ConfigError(f"select_metric={self.select_metric!r}: expected 'score' or one of {valid}") from None
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
        instead of reusing results of the old one."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_HASH}
        if self.synthetic and self.data_root is None:
            from .data.synthetic import GENERATOR_VERSION

            data["synthetic_generator"] = GENERATOR_VERSION  # new synthetic pixels: new run folders
        normalization = self.input_normalization()  # the normalisation used, however it was asked for
        data["normalize"] = normalization if isinstance(normalization, str) else [list(v) for v in normalization]
        for key, default in HASH_STABLE_DEFAULTS.items():
            if key.startswith("model."):
                if data["model"].get(key[len("model."):], default) == default:
                    data["model"].pop(key[len("model."):], None)
            elif data.get(key, default) == default:
                data.pop(key, None)
        from .models.pretrained import get_pretrained, is_pretrained_name

        if is_pretrained_name(self.model.pretrained):
            data["pretrained_sha256"] = get_pretrained(self.model.pretrained).sha256
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def input_normalization(self):
        """What the data pipeline normalises inputs with: ``normalize`` when set, else what ``model.pretrained``
        expects (:func:`endoarss_lib.models.pretrained.weights_transforms`): ``"imagenet"``, ``"unit"`` or a
        ``(mean, std)`` pair."""
        if self.normalize is not None:
            return self.normalize
        from .models.pretrained import weights_transforms

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


def preset(name: str, **overrides) -> TrainConfig:
    """A config from a preset, with field overrides; values that follow the dataset (the paper's lr, the headline
    weighting) follow the ``dataset`` given, unless overridden."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
    if "model" in overrides and isinstance(overrides["model"], ModelConfig):
        overrides = {**overrides, "model": overrides["model"].to_dict()}
    values = {**PRESETS[name], **overrides, "preset": name}
    dataset = values.get("dataset", "mtlesd")
    for (pname, key), by in _BY_DATASET.items():
        if pname == name and key not in overrides and dataset in by:
            values[key] = by[dataset]
    if name == "released" and values.get("weighting") == "stch" and "weighting_hparams" not in overrides:
        values["weighting_hparams"] = dict(_RELEASED_STCH)
    values["model"] = _merge_model(PRESETS[name]["model"], overrides.get("model", {}))
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; see `python -m endoarss_lib.train --help`")
    return TrainConfig(**values)


_DERIVED_MODEL_KEYS = ("num_activities", "num_seg_classes", "task_classes", "image_size")  # from the data and run


def parse_overrides(items) -> dict:
    """``["epochs=5", "model.arch=hps", "amp=off"]`` -> ``{"epochs": 5, "model": {"arch": "hps"}, "amp": "off"}``.

    Values are typed by their field (text fields stay text, so ``amp=off`` is ``"off"``); unknown fields are errors.
    """
    import typing

    hints = typing.get_type_hints(TrainConfig)
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("model."):
            out.setdefault("model", {})[key[len("model."):]] = parse_text(text)
        elif key in hints:
            out[key] = text if hints[key] is str else parse_text(text)
        else:
            raise ConfigError(f"override {item!r}: unknown config field {key!r}; see `python -m endoarss_lib.train "
                              "--help`")
    return out


def _merge(base: dict, changes: dict) -> dict:
    out = {**base, **changes}
    if "model" in changes and isinstance(changes["model"], dict):
        out["model"] = _merge_model(base.get("model", {}), changes["model"])
    return out


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings to a config (values typed by their field; ``model.arch=hps`` sets a model option).

    A preset's dataset-dependent values (the paper's lr, the headline weighting) follow a ``dataset=`` override
    unless they are overridden too.
    """
    changes = parse_overrides(overrides)
    base = config.to_dict()
    base["model"] = {k: v for k, v in base["model"].items() if k not in _DERIVED_MODEL_KEYS}
    values = _merge(base, changes)
    if "dataset" in changes and config.preset in PRESETS:
        for (pname, key), by in _BY_DATASET.items():
            if pname == config.preset and key not in changes and values["dataset"] in by:
                values[key] = by[values["dataset"]]
    return TrainConfig(**values)


def load_config(path: str | Path | None = None, overrides: list[str] = (), preset_name: str = "smoke"
                ) -> TrainConfig:
    """A config from a YAML file (``preset: <name>`` first, then fields) or a preset, then ``key=value`` overrides.

    File values and overrides are merged first and the config is made once, so a field can be completed by an
    override (``--preset paper data_root=/data/MTLESD``) and dataset-dependent preset values follow the final
    ``dataset``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=YAMLLoader) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        preset_name = data.pop("preset", preset_name)
    values = _merge(data, parse_overrides(overrides))
    try:
        return preset(preset_name, **values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def config_help() -> str:
    """Every TrainConfig field and model option with its type, default and meaning (the CLI's ``--help``)."""
    lines = ["run fields (key=value):"]
    for name, kind, default, meaning in field_help(TrainConfig):
        lines.append(f"  {name:<24} {kind:<28} default {default:<14} {meaning}")
    lines.append("model options (model.<option>=value):")
    for name, kind, default, meaning in field_help(ModelConfig):
        lines.append(f"  {name:<24} {kind:<28} default {default:<14} {meaning}")
    return "\n".join(lines)
