"""Inference on finished runs: load a run's selected model, predict, evaluate on its own or another dataset.

One module, no plotting: :func:`load_run_model` rebuilds a run's model exactly (the frozen weights from the
pretrained file, checked by sha256, or, for a randomly initialised backbone, from the run seed) and loads its
selected checkpoint; :func:`predict` gives per-image predictions for display; :func:`evaluate_run` evaluates a run on
a split of its own data and :func:`evaluate_run_on` on another dataset (e.g. MTLEndovis-Gen), both through the one
evaluation pass of :func:`endoarss_lib.training.engine.evaluate` (per-class, per-subset and per-image results included).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import MTLDataset, make_loader
from ..data.dataset import to_uint8_image
from ..evidence.outcomes import restrict_outcomes
from ..metrics import per_activity_spread
from ..tasks import DEFAULT_TASKS, EvalSubset, add_targets, get_task
from ..training.engine import (COMPAT_SIZE, Evaluation, build_run_model, evaluate, load_checkpoint, make_datasets,
                               read_run_config, resolve_device, seed_everything, weights_digest)
from ..training.rows import ResultRow

__all__ = ["load_run_model", "predict", "evaluate_run", "evaluate_run_on", "per_class_spread", "prior_predictor",
           "generalisation_table", "group_recalls"]


def load_run_model(folder: str | Path, device: str = "cpu", checkpoint: str | Path | None = None):
    """The selected (best) model of a run folder, rebuilt from its ``config.json``, in eval mode (``checkpoint``:
    another checkpoint file of that run instead of ``best.pt``).

    Checkpoints hold the trainable parameters only; frozen weights come from the pretrained file (its sha256 must be
    the one the run recorded: a replaced file is an error) or, for a randomly initialised backbone, from the run
    seed: the model is built after ``seed_everything(cfg.seed)`` as ``fit`` builds it, inside forked RNGs, so the
    caller's random state is left alone.
    """
    folder = Path(folder)
    cfg = read_run_config(folder)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            seed_everything(cfg.seed)
            model = build_run_model(cfg)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    checkpoint = folder / "best.pt" if checkpoint is None else Path(checkpoint)
    load_checkpoint(checkpoint, model, cfg.results_hash(), weights_digest(model))
    model.run_config = cfg
    return model.to(resolve_device(device)).eval()


@torch.no_grad()
def predict(model, dataset, indices=None, device: str = "cpu") -> list[dict]:
    """Per-sample predictions for display: image (uint8), true / predicted mask and activity, class probabilities."""
    model.eval()
    dev = resolve_device(device)
    out = []
    for index in (range(len(dataset)) if indices is None else indices):
        item = dataset[int(index)]
        result = model(item["image"][None].to(dev))
        row = {"index": int(index), "path": item["path"],
               "image": to_uint8_image(item["image"], getattr(dataset, "normalize", "imagenet")),
               "mask": item["mask"].numpy(), "label": int(item["label"])}
        for t, logits in result.items():
            task = get_task(t)
            if task.display is not None:
                row.update(task.display(logits[0]))
        out.append(row)
    return out


def _evaluate(model, dataset: MTLDataset, tasks, device: str, batch_size: int, distances: bool, per_image: bool,
              amp: str = "off", per_image_arrays: bool = False) -> Evaluation:
    loader = make_loader(dataset, batch_size, shuffle=False)
    ev = evaluate(model, loader, resolve_device(device), tasks, spec=dataset.spec, distances=distances, amp=amp,
                  ignore_index=dataset.ignore_index, per_image=per_image, compat_size=COMPAT_SIZE,
                  per_image_arrays=per_image_arrays)
    for t in tasks:
        key = get_task(t).per_class
        if key is not None:
            ev[f"{t}_{key}"] = [float(v) for v in ev.values[t][key]]
    return ev


def _subset_metrics(ev: Evaluation, tasks, subset: EvalSubset) -> dict:
    """Each task's metrics over an evaluated subset of a dataset (``<task>_<metric>_eval``: its ``subset`` hook)."""
    out = {}
    for t in tasks:
        task = get_task(t)
        if task.subset is not None and t in ev.values:
            out.update({f"{t}_{k}": v for k, v in task.subset(ev.values[t], ev.images, subset).items()})
    return out


def evaluate_run(folder: str | Path, split: str = "test", device: str = "cpu", distances: bool = True,
                 per_image: bool = False, batch_size: int = 8, per_image_arrays: bool = False) -> Evaluation:
    """A finished run's selected model on a split (``train``, ``val`` or ``test``) of its own data."""
    cfg = read_run_config(folder)
    model = load_run_model(folder, device=device)
    dataset = make_datasets(cfg, splits=(split,))[split]
    return _evaluate(model, dataset, cfg.tasks, device, batch_size, distances, per_image, cfg.amp, per_image_arrays)


def evaluate_run_on(folder: str | Path, data_root: str | Path, dataset: str, image_size: int | None = None,
                    split: str = "test", device: str = "cpu", batch_size: int = 8, distances: bool = True,
                    per_image: bool = False, per_image_arrays: bool = False) -> Evaluation:
    """A finished run's selected model on another dataset (e.g. MTLEndovis-Gen), with subset means.

    Besides the usual keys (over every class present), ``<task>_<metric>_eval`` keys average over the dataset's
    evaluated subset only (its registry ``eval_seg_classes`` / ``eval_activities``: ``seg_miou_eval``,
    ``seg_dice_eval``; ``cls_accuracy_eval`` with ``per_image=True``); ``dataset``, ``data`` say what it was.
    ``per_image_arrays``: every image's outcome in ``Evaluation.arrays`` (as ``test_per_image.npz`` holds them).
    """
    cfg = read_run_config(folder)
    model = load_run_model(folder, device=device)
    data = MTLDataset(data_root, split, dataset=dataset, image_size=image_size or cfg.image_size,
                      normalize=cfg.input_normalization(), ignore_index=cfg.ignore_index)
    ev = _evaluate(model, data, cfg.tasks, device, batch_size, distances, per_image, cfg.amp, per_image_arrays)
    spec = data.spec
    ev.update(_subset_metrics(ev, cfg.tasks, EvalSubset.of(spec)))
    ev.update({"dataset": spec.name, "data": "synthetic" if data.synthetic else "real"})
    return ev


def per_class_spread(folder: str | Path, split: str = "test", device: str = "cpu") -> dict[str, float]:
    """The spread the paper's Table V "+-" reports, for one run (see :func:`endoarss_lib.metrics.per_activity_spread`):
    the standard deviation over activities of per-activity accuracy and of per-activity foreground IoU (pooled over
    each activity's images), and the standard deviation of the per-image foreground IoUs (the released code's)."""
    ev = evaluate_run(folder, split=split, device=device, distances=False, per_image=True)
    return per_activity_spread(ev.images)


def prior_predictor(train: MTLDataset, test: MTLDataset, compat_size: int | None = COMPAT_SIZE,
                    tasks=DEFAULT_TASKS) -> dict:
    """Test metrics of the floor every model must beat: per task the constant prediction its ``prior_output`` learns
    from the training split (the activity: always the most frequent training activity; segmentation: for every pixel
    the class most frequent at that position in the training masks). Keys as a result row (``test_...``)."""
    outputs = {t: get_task(t).prior_output(train, get_task(t).num_classes(train.spec)) for t in tasks}
    meters = {t: get_task(t).make_meter(get_task(t).num_classes(test.spec), ignore_index=test.ignore_index,
                                        compat_size=compat_size) for t in tasks}
    for index in range(len(test)):
        item = test[index]
        batch = add_targets({k: v[None] if torch.is_tensor(v) else [v] for k, v in item.items()}, tasks, test.spec)
        for t, meter in meters.items():
            get_task(t).update_meter(meter, outputs[t][None], batch)
    metrics = {}
    for t, meter in meters.items():
        metrics.update({f"test_{k}": v for k, v in get_task(t).result_values(meter.compute()).items()})
    return ResultRow.with_provenance(
        source="prior", dataset=test.spec.name, data="synthetic" if test.synthetic else "real", tasks="+".join(tasks),
        image_size=test.image_size, compat_eval_size=compat_size, metrics=metrics,
        extra={"name": "prior predictor"}).to_dict()


def _subset_view(ev: Evaluation, activities, classes, spec=None) -> dict:
    """Each task's metrics over ``activities`` and segmentation ``classes`` (of dataset ``spec``) of one pass."""
    return _subset_metrics(ev, list(ev.values), EvalSubset(frozenset(activities), tuple(classes), spec))


def generalisation_table(rows, shifted: MTLDataset, device: str = "cpu", outcomes: dict | None = None):
    """In-domain test vs the domain-shifted set (paper Table IV) for every run in ``rows`` (result rows), compared
    like with like: besides the metrics over everything present, ``*_eval`` columns restrict BOTH sides to the
    shifted set's evaluated activities and segmentation classes (its registry subset), so a difference is the
    domain gap and not a change of which classes are averaged.

    ``outcomes``: a dict that receives each run's per-image outcomes on both test sets, restricted alike
    (:func:`endoarss_lib.evidence.outcomes.restrict_outcomes`), keyed ``("in-domain" | "shifted", seed)`` (with
    ``(variant, label, seed)`` when the rows have several variants): what the generalisation claims are decided on."""
    spec = shifted.spec
    activities = set(spec.eval_activities) if spec.eval_activities is not None else set(shifted.labels)
    classes = list(spec.eval_seg_classes or range(spec.num_seg_classes))
    several = "variant" in rows and rows["variant"].nunique() > 1
    records = []
    for _, row in rows.iterrows():
        arrays = outcomes is not None
        for label, ev in (("in-domain", evaluate_run(row["run_dir"], "test", device, distances=False,
                                                     per_image=True, per_image_arrays=arrays)),
                          ("shifted", evaluate_run_on(row["run_dir"], shifted.root, spec.name, shifted.image_size,
                                                      device=device, distances=False, per_image=True,
                                                      per_image_arrays=arrays))):
            if arrays:
                key = (row["variant"], label, int(row["seed"])) if several else (label, int(row["seed"]))
                outcomes[key] = restrict_outcomes(ev.arrays, labels=sorted(activities), classes=classes)
            metrics = {f"test_{k}": v for k, v in ev.items() if isinstance(v, float)}
            metrics.update({f"test_{k}": v for k, v in _subset_view(ev, activities, classes, spec).items()})
            records.append(_evaluation_row(row, ev, metrics, device, {"name": row.get("name"), "test set": label}))
    return pd.DataFrame(records)


_RUN_FIELDS = ("backbone", "arch", "sma", "weighting", "tasks", "connector", "cls_loss", "model_label",
               "paper_backbone", "pretrained", "pretrained_name", "weights_sha256", "random_init_backbone",
               "synthetic_pretrained_backbone", "seed", "preset", "image_size", "epochs", "best_epoch", "select_on",
               "config_hash", "run_dir")


def _evaluation_row(run_row, ev: Evaluation, metrics: dict, device: str, extra: dict) -> dict:
    """A result row (source ``evaluate``) of a finished run evaluated again: the run's model fields (from its own
    row), the evaluated dataset, the metrics and this process's provenance."""
    fields = {k: run_row.get(k) for k in _RUN_FIELDS}
    fields = {k: (v.item() if hasattr(v, "item") else v) for k, v in fields.items()}  # numpy scalars from frames
    return ResultRow.with_provenance(
        resolve_device(device), source="evaluate", dataset=ev.get("dataset", run_row.get("dataset")),
        data=ev.get("data", run_row.get("data")), compat_eval_size=COMPAT_SIZE, metrics=metrics,
        deterministic=torch.are_deterministic_algorithms_enabled(), **fields, extra=extra).to_dict()


def group_recalls(folder: str | Path, groups, split: str = "test", device: str = "cpu") -> dict:
    """Mean recall over the activities of each class group (e.g. MEJO's head / medium / tail from
    :func:`endoarss_lib.training.losses.class_groups`, one label per activity) on a split of a run's own data, over the
    activities present in the split, and how many distinct activities the model predicts."""
    ev = evaluate_run(folder, split=split, device=device, distances=False, per_image=True)
    groups = np.asarray(groups)
    out = {}
    for g in dict.fromkeys(groups.tolist()):
        recalls = [np.mean([r["correct"] for r in ev.images if r["label"] == k])
                   for k in np.flatnonzero(groups == g) if any(r["label"] == k for r in ev.images)]
        out[f"recall {g}"] = float(np.mean(recalls)) if recalls else float("nan")
    out["distinct predicted activities"] = len({r["pred_label"] for r in ev.images})
    return out
