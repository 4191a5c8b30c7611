"""One training configuration (a dataclass) and its presets: ``smoke``, ``paper``, ``released``."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "PRESETS", "preset", "load_config", "apply_overrides", "data_home"]


def data_home() -> Path:
    """Where generated data go: $ENDOARSS_DATA, else the ``data/`` folder beside the package (the repository's)."""
    return Path(os.environ.get("ENDOARSS_DATA", Path(__file__).resolve().parents[1] / "data"))

_RESULT_FIELDS_THAT_DO_NOT_CHANGE_RESULTS = ("out_dir", "run_name", "num_workers", "progress", "stop_after_epochs",
                                             "device")
# Fields added after the first runs: left out of the results hash while at their defaults, so that configs which do
# not use them keep their hash (and their run folders).
_LATER_FIELD_DEFAULTS = {"cls_loss": "ce", "cls_loss_hparams": {}}
CLS_LOSSES = ("ce", "cgl")
_CGL_HPARAMS = ("p", "grouping", "head", "tail")


@dataclass
class TrainConfig:
    """Everything a run needs; ``model`` holds :func:`endoarss_lib.models.build_model` options."""

    preset: str = "smoke"
    # data
    dataset: str = "mtlesd"  # registry name; with synthetic=True the synthetic preset of that dataset
    data_root: str | None = None  # None + synthetic: <data home>/synthetic_<dataset>_<n>_<size>px (generated)
    synthetic: bool = True
    synthetic_n_train: int = 64
    synthetic_n_test: int = 24
    synthetic_seed: int = 0
    image_size: int = 112
    val_fraction: float = 0.2
    split_seed: int = 0
    augment: bool = True
    id_map: Any = None  # None | "identity" | "released" | {raw: train}
    # model
    model: dict = field(default_factory=lambda: {"backbone": "vit_tiny_patch14", "arch": "tesla", "sma": False})
    # multi-task weighting (architecture lives in model["arch"])
    weighting: str = "ew"
    weighting_hparams: dict = field(default_factory=dict)
    loss_weights: dict = field(default_factory=lambda: {"cls": 1.0, "seg": 1.0})
    # activity loss: "ce" (cross-entropy) | "cgl" (MEJO's Coordinated Gradient Learning; class counts from the training
    # split, Bernoulli masks from a generator seeded by the run seed); cls_loss_hparams: p, grouping, head, tail
    cls_loss: str = "ce"
    cls_loss_hparams: dict = field(default_factory=dict)
    label_smoothing: float = 0.0
    ignore_index: int = 255
    # optimisation
    epochs: int = 3
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    scheduler: str = "none"  # none | step | cosine
    step_size: int = 100
    gamma: float = 0.5
    grad_accum: int = 1
    # selection and evaluation
    select_metric: str = "score"  # score = mean(val accuracy, val mIoU); or any val metric key (higher is better)
    eval_distances_on_val: bool = False  # HD/SSIM on validation each epoch (slower); test always gets them
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    compile: bool = False
    num_workers: int = 0
    diagnostics_every: int = 0  # log task-gradient conflict every k steps (0: off)
    out_dir: str = "results/runs"
    run_name: str | None = None  # None: derived from the config hash
    progress: bool = True
    stop_after_epochs: int | None = None  # stop early (simulates an interruption; resume continues)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check values; a ValueError names the field and what was expected."""
        checks = [("epochs", self.epochs >= 1, "an int >= 1"), ("batch_size", self.batch_size >= 1, "an int >= 1"),
                  ("lr", self.lr > 0, "> 0"), ("grad_accum", self.grad_accum >= 1, "an int >= 1"),
                  ("val_fraction", 0 < self.val_fraction < 1, "a fraction in (0, 1): selection needs validation"),
                  ("scheduler", self.scheduler in ("none", "step", "cosine"), "'none', 'step' or 'cosine'"),
                  ("amp", self.amp in ("auto", "bf16", "off"), "'auto', 'bf16' or 'off'"),
                  ("diagnostics_every", self.diagnostics_every >= 0, "an int >= 0"),
                  ("image_size", self.image_size >= 14, "an int >= 14")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"config {name}={getattr(self, name)!r}: expected {expected}")
        if not isinstance(self.model, dict):
            raise ValueError(f"config model={self.model!r}: expected a dict of build_model options")
        unknown = set(self.loss_weights) - {"cls", "seg"}
        if unknown:
            raise ValueError(f"config loss_weights has unknown tasks {sorted(unknown)}; expected 'cls', 'seg'")
        if self.cls_loss not in CLS_LOSSES:
            raise ValueError(f"config cls_loss={self.cls_loss!r}: expected one of {CLS_LOSSES}")
        if not isinstance(self.cls_loss_hparams, dict):
            raise ValueError(f"config cls_loss_hparams={self.cls_loss_hparams!r}: expected a dict")
        valid = _CGL_HPARAMS if self.cls_loss == "cgl" else ()
        unknown = sorted(set(self.cls_loss_hparams) - set(valid))
        if unknown:
            raise ValueError(f"config cls_loss_hparams has unknown keys {unknown} for cls_loss={self.cls_loss!r}; "
                             f"valid: {list(valid)}")
        if self.cls_loss == "cgl" and self.label_smoothing:
            raise ValueError(f"config label_smoothing={self.label_smoothing!r}: expected 0 with cls_loss='cgl' (a "
                             "sigmoid BCE loss)")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.model.get("tasks", ("cls", "seg")))

    def to_dict(self) -> dict:
        return asdict(self)

    def results_hash(self) -> str:
        """Hash of every field that can change the results (not paths, workers or progress bars)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _RESULT_FIELDS_THAT_DO_NOT_CHANGE_RESULTS
                and not (k in _LATER_FIELD_DEFAULTS and v == _LATER_FIELD_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


_PAPER_MODEL = {"backbone": "dinov2_vitb14", "arch": "tesla", "sma": True, "lora_rank": 4}

PRESETS: dict[str, dict] = {
    # Seconds on a CPU: a tiny ViT on a few dozen small synthetic images.
    "smoke": dict(synthetic=True, image_size=112, epochs=3, batch_size=8, lr=3e-3,
                  model={"backbone": "vit_tiny_patch14", "arch": "tesla", "sma": False}),
    # The paper (Sec. IV-B): Adam, batch 16, 200 epochs, lr 1e-4 (MTLESD) / 1e-3 (MTLEndovis), no scheduler stated.
    "paper": dict(synthetic=False, image_size=224, epochs=200, batch_size=16, lr=1e-4, scheduler="none",
                  weight_decay=0.0, model=dict(_PAPER_MODEL), weighting="db_mtl"),
    # What the authors' released code runs: batch 32, 150 epochs, lr 1.1e-3, StepLR(100, 0.5), wd 1e-4.
    "released": dict(synthetic=False, image_size=224, epochs=150, batch_size=32, lr=1.1e-3, scheduler="step",
                     step_size=100, gamma=0.5, weight_decay=1e-4, model=dict(_PAPER_MODEL), weighting="db_mtl"),
}
_PAPER_LR = {"mtlesd": 1e-4, "mtlendovis": 1e-3}


def preset(name: str, **overrides) -> TrainConfig:
    """A config from a preset, with field overrides (the paper preset's lr follows the dataset)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides, "preset": name}
    if name == "paper" and "lr" not in overrides:
        values["lr"] = _PAPER_LR.get(values.get("dataset", "mtlesd"), 1e-4)
    values["model"] = {**PRESETS[name]["model"], **overrides.get("model", {})}
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise TypeError(f"unknown config field(s) {unknown}")
    return TrainConfig(**values)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (YAML values; ``model.arch=hps`` sets a model option)."""
    values = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        if key.startswith("model."):
            values["model"] = {**values["model"], key[len("model."):]: _parse_value(text)}
        elif key in values:
            values[key] = _parse_value(text)
        else:
            raise ValueError(f"override {item!r}: unknown config field {key!r}")
    return replace(config, **values)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A config from a YAML file (``preset: <name>`` first, then fields), then ``key=value`` overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    name = data.pop("preset", "smoke")
    try:
        config = preset(name, **data)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return apply_overrides(config, list(overrides))
