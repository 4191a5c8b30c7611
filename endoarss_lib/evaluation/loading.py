"""A trained model with what running it on new images needs: its input transform, its tasks and class names.

:func:`load_inference_model` takes what a user has after training or exporting:

* a **run folder** (``config.json`` + ``best.pt``, written by ``endoarss-train`` / ``fit``): the selected model,
  rebuilt exactly as :func:`endoarss_lib.evaluation.inference.load_run_model` does;
* a **checkpoint file** of a run (``best.pt``, or ``last.pt`` of an unfinished run) with the run's ``config.json``
  beside it;
* an **exported model** (``model.pt2`` with its record ``model.json``, written by ``endoarss-export``), or the export
  folder holding them.

Every form gives an :class:`InferenceModel`: a callable ``images -> {task: logits}`` plus the input side, the
normalisation the model was trained with (the run's ``TrainConfig.input_normalization()``, the weights record's mean
and std), the activity and segmentation class names, and a record of where it came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import DataError
from ..data.dataset import normalization_stats, resolve_spec
from ..data.registry import SYNTHETIC_PRESETS, get_spec
from ..tasks import get_task
from ..training.engine import RunError, resolve_device
from .inference import load_run_model

__all__ = ["InferenceModel", "load_inference_model", "run_class_names", "EXPORT_FORMAT", "read_export_record",
           "CHECKPOINT_SUFFIXES"]

EXPORT_FORMAT = "endoarss-export"  # the "format" field of an export record (model.json)
CHECKPOINT_SUFFIXES = (".pt", ".pth")
_HOW_TO_EXPORT = "endoarss-export RUN_DIR --out DIR writes model.pt2 with its record model.json"


@dataclass
class InferenceModel:
    """A model ready for inference on images of any size (resized to ``image_size`` x ``image_size``)."""

    forward: Callable[[torch.Tensor], dict]  # (B, 3, s, s) normalised float -> {task: logits}
    tasks: tuple[str, ...]
    activities: tuple[str, ...]  # names of the cls task's classes
    seg_classes: tuple[str, ...]  # names of the seg task's classes (0: background)
    image_size: int
    normalize: Any  # "imagenet", "unit" or a (mean, std) pair (endoarss_lib.data.dataset.normalization_stats)
    device: torch.device
    amp: str = "off"
    fixed_size: bool = False  # an exported program: only image_size x image_size inputs
    instruments: tuple[str, ...] = ()  # names of the presence task's classes
    source: dict = field(default_factory=dict)  # where the model came from (kind, path, config hash, ...)
    module: torch.nn.Module | None = None  # the PyTorch model (run folders and checkpoints)
    config: Any = None  # the run's TrainConfig (run folders and checkpoints)

    def __call__(self, images: torch.Tensor) -> dict:
        return self.forward(images)

    def class_names(self, task: str) -> tuple[str, ...]:
        """The class names of ``task``'s output, by the dataset field its class count comes from
        (``Task.classes_field``); empty when the model carries none for it."""
        by_field = {"num_activities": self.activities, "num_seg_classes": self.seg_classes,
                    "num_instruments": self.instruments}
        return tuple(by_field.get(get_task(task).classes_field, ()))

    def tasks_of(self, kind: str) -> tuple[str, ...]:
        """The model's tasks whose ``frame_output`` is ``kind`` (``label``, ``labels`` or ``mask``)."""
        return tuple(t for t in self.tasks if get_task(t).frame_output == kind)


def run_class_names(cfg) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(activity names, segmentation class names, instrument names) of a run: those of its dataset's spec (the
    synthetic preset's when the run's data are synthetic, read from the dataset card when the data root is there);
    generic names (``activity_k``, ``class_k``) where the spec's counts differ from the model's."""
    spec = get_spec(cfg.dataset)
    if cfg.synthetic:
        spec = get_spec(SYNTHETIC_PRESETS.get(cfg.dataset, cfg.dataset))
    else:
        try:
            root = cfg.data_root_path()
            if root.is_dir():
                spec = resolve_spec(root, cfg.dataset)[0]
        except (DataError, ValueError, OSError):
            pass  # the names only: the spec's own are fine
    m = cfg.model
    activities = (spec.activities if len(spec.activities) == m.num_activities
                  else tuple(f"activity_{k}" for k in range(m.num_activities)))
    classes = (spec.seg_classes if len(spec.seg_classes) == m.num_seg_classes
               else tuple(f"class_{k}" for k in range(m.num_seg_classes)))
    instruments = tuple(classes[c] for c in (spec.instrument_classes or ()) if c < len(classes))
    return tuple(activities), tuple(classes), instruments


def _check_run_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder}: not a run folder (no config.json) and not an export folder (no model.json); "
                       f"expected the folder endoarss-train wrote (<out_dir>/<run name>/ with config.json and "
                       f"best.pt), a checkpoint file beside its config.json, or an exported model.pt2")
    if not (folder / "best.pt").is_file():
        state = (" last.pt is there: the run is still training or was interrupted before finishing an epoch."
                 if (folder / "last.pt").is_file() else "")
        raise RunError(f"{folder / 'best.pt'}: no checkpoint in this run folder (best.pt is written when the first "
                       f"epoch ends).{state} Finish the training (rerun the same endoarss-train command: it "
                       f"resumes), or pass a run folder that holds best.pt, or a checkpoint file whose config.json "
                       f"is beside it")


def _from_run(folder: Path, checkpoint: Path, device: torch.device) -> InferenceModel:
    model = load_run_model(checkpoint.parent, device=str(device), checkpoint=checkpoint)
    cfg = model.run_config
    activities, classes, instruments = run_class_names(cfg)
    return InferenceModel(
        forward=model, tasks=tuple(cfg.tasks), activities=activities, seg_classes=classes, image_size=cfg.image_size,
        normalize=cfg.input_normalization(), device=device, amp=cfg.amp, instruments=instruments, module=model,
        config=cfg, source={"kind": "run", "path": str(folder), "checkpoint": str(checkpoint),
                            "config_hash": cfg.results_hash(), "dataset": cfg.dataset,
                            "backbone": cfg.model.backbone, "arch": cfg.model.arch})


def read_export_record(path: str | Path) -> dict:
    """The record ``endoarss-export`` writes beside an exported model (``<name>.json``); RunError naming it else."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: the export record is missing (it says which normalisation, input size and class "
                       f"names the exported model has); export again: {_HOW_TO_EXPORT}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc}); export again: {_HOW_TO_EXPORT}") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise RunError(f"{path}: not an endoarss export record (expected \"format\": \"{EXPORT_FORMAT}\"); export "
                       f"again: {_HOW_TO_EXPORT}")
    return record


def _from_export(program: Path, device: torch.device) -> InferenceModel:
    record = read_export_record(program.with_suffix(".json"))
    try:
        module = torch.export.load(str(program)).module()
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which, and what to do
        raise RunError(f"{program}: not a readable torch.export program ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); export again: {_HOW_TO_EXPORT}") from None
    module = module.to(device)
    normalize = record["normalize"]
    normalize = normalize if isinstance(normalize, str) else tuple(tuple(v) for v in normalize)
    normalization_stats(normalize)  # a damaged record is an error here, not in the first batch
    return InferenceModel(
        forward=module, tasks=tuple(record["tasks"]), activities=tuple(record["activities"]),
        seg_classes=tuple(record["seg_classes"]), image_size=int(record["image_size"]), normalize=normalize,
        device=device, fixed_size=True, instruments=tuple(record.get("instruments", ())),
        source={"kind": "export", "path": str(program), **{k: record.get(k) for k in ("run", "config_hash")}})


def load_inference_model(path: str | Path, device: str = "cpu") -> InferenceModel:
    """A run folder, a run's checkpoint file, an exported ``.pt2`` or an export folder as an :class:`InferenceModel`
    on ``device`` (``auto``, ``cpu``, ``cuda``); RunError naming the path, with what to do, for anything else."""
    path = Path(path).expanduser()
    dev = resolve_device(device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            programs = sorted(path.glob("*.pt2"))
            if len(programs) == 1:
                return _from_export(programs[0], dev)
            if len(programs) > 1:
                raise RunError(f"{path}: holds several exported models {[p.name for p in programs]}; pass one "
                               f"of them")
        _check_run_folder(path)
        return _from_run(path, path / "best.pt", dev)
    if path.is_file():
        if path.suffix == ".pt2":
            return _from_export(path, dev)
        if path.suffix in CHECKPOINT_SUFFIXES:
            if not (path.parent / "config.json").is_file():
                raise RunError(f"{path}: a checkpoint holds the trained weights only; its run's config.json must be "
                               f"beside it ({path.parent / 'config.json'} is missing). Pass the run folder, or copy "
                               f"the run's config.json next to the checkpoint")
            return _from_run(path.parent, path, dev)
        raise RunError(f"{path}: expected a run folder, a run's checkpoint (.pt beside its config.json) or an "
                       f"exported model (.pt2 beside its .json record; {_HOW_TO_EXPORT})")
    raise RunError(f"{path}: no such file or folder; expected a run folder (<out_dir>/<run name>/ as endoarss-train "
                   f"wrote it), a checkpoint file or an exported .pt2")
