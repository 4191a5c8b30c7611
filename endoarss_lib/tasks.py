"""The task registry (in the spirit of LibMTL's ``task_dict``): each task declares its name, what its head predicts,
its loss, its meter and its result metrics with their direction and the paper column they map to.

Everything that lists metrics or branches on a task reads this module: the engine's evaluation and model selection,
result rows, Delta_m, the paper comparison, the robustness tables. Adding a metric is one edit: append a
:class:`Metric` to its task here (with ``compute`` if the meter does not already return it under that name).

Result keys are ``<task>_<metric>`` (``cls_accuracy``, ``seg_hd95``); result rows prefix the split
(``test_seg_miou``, ``val_cls_accuracy``). :func:`metric_info` resolves any such key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Metric", "Task", "TASKS", "TASK_NAMES", "get_task", "metric_info", "higher_is_better", "result_keys",
           "split_key", "delta_m_keys", "main_keys", "paper_columns", "register_metric"]


@dataclass(frozen=True)
class Metric:
    """One result metric of a task.

    ``name``: key in the task's meter output (and the result key after ``<task>_``); ``higher_is_better``: its
    direction (model selection, Delta_m, best-per-column highlighting); ``label``: short table label; ``paper``:
    the paper's table column this value reproduces (the ``compat_`` metrics: the released formulas under the
    paper's names), ``beside``: the correct metric shown next to it, ``paper_scale``: factor to the paper's units,
    ``note``: what the correct metric means against the compat one; ``delta_m``: enters the multi-task gain;
    ``main``: shown in the main tables; ``unit``: ``fraction`` (0..1), ``pixels``, ``rate`` or ``count``;
    ``compute``: ``meter values -> float`` when the meter has no key ``name``.
    """

    name: str
    higher_is_better: bool
    label: str
    paper: str | None = None
    beside: str | None = None
    paper_scale: float = 100.0
    note: str = ""
    delta_m: bool = False
    main: bool = True
    unit: str = "fraction"
    compute: Callable[[Mapping[str, Any]], float] | None = None

    def value(self, meter_values: Mapping[str, Any]) -> float:
        """This metric from a meter's ``compute()`` output (NaN when it is not there)."""
        if self.compute is not None:
            return float(self.compute(meter_values))
        v = meter_values.get(self.name)
        return float(v) if v is not None else float("nan")


def _cls_predicted_classes(values: Mapping[str, Any]) -> float:
    cm = np.asarray(values["confusion"])
    return float((cm.sum(0) > 0).sum())


def _cls_majority_accuracy(values: Mapping[str, Any]) -> float:
    cm = np.asarray(values["confusion"])
    total = cm.sum()
    return float(cm.sum(1).max() / total) if total else float("nan")


def _seg_pred_fg_fraction(values: Mapping[str, Any]) -> float:
    cm = np.asarray(values["confusion"])
    total = cm.sum()
    return float(1.0 - cm[:, 0].sum() / total) if total else float("nan")


def _seg_true_fg_fraction(values: Mapping[str, Any]) -> float:
    cm = np.asarray(values["confusion"])
    total = cm.sum()
    return float(1.0 - cm[0].sum() / total) if total else float("nan")


@dataclass(frozen=True)
class Task:
    """One task: its name, what its head predicts, its loss, its meter and its metrics.

    ``classes_field``: the :class:`~endoarss_lib.models.ModelConfig` / dataset-spec attribute holding its number of
    classes; ``target``: the batch key of its ground truth.
    """

    name: str
    description: str
    classes_field: str
    target: str
    metrics: tuple[Metric, ...] = field(default_factory=tuple)

    # -- metrics -------------------------------------------------------------------------------------------------
    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.name!r} has no metric {name!r}; metrics: {[m.name for m in self.metrics]}")

    def result_values(self, meter_values: Mapping[str, Any]) -> dict[str, float]:
        """``{<task>_<metric>: value}`` for every declared metric."""
        return {f"{self.name}_{m.name}": m.value(meter_values) for m in self.metrics}

    # -- meter ---------------------------------------------------------------------------------------------------
    def make_meter(self, num_classes: int, ignore_index: int = 255, distances: bool = True,
                   compat_size: int | None = None):
        """The task's meter (``compat_size``: resolution of the segmentation ``compat_`` values, see
        :class:`~endoarss_lib.metrics.SegmentationMeter`)."""
        from .metrics import ClassificationMeter, SegmentationMeter

        if self.name == "cls":
            return ClassificationMeter(num_classes)
        return SegmentationMeter(num_classes, ignore_index=ignore_index, compute_distances=distances,
                                 compute_ssim=distances, compat_size=compat_size)

    def update_meter(self, meter, output: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Add a batch: the task's logits (argmax over the class axis) against its target."""
        meter.update(output.float().argmax(1).cpu(), batch[self.target].cpu())

    # -- loss ----------------------------------------------------------------------------------------------------
    def loss(self, output: torch.Tensor, batch: Mapping[str, Any], ignore_index: int = 255,
             label_smoothing: float = 0.0, weight: torch.Tensor | None = None, loss_fn=None) -> torch.Tensor:
        """The task's raw loss as a float32 scalar (cross-entropy, or ``loss_fn(logits, target)`` when given)."""
        target = batch[self.target]
        logits = output.float()
        if loss_fn is not None:
            return loss_fn(logits, target)
        if self.name == "seg":
            if logits.shape[-2:] != target.shape[-2:]:
                raise ValueError(f"seg logits {tuple(logits.shape[-2:])} and masks {tuple(target.shape[-2:])} "
                                 "differ in size")
            return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing)
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)

    @torch.no_grad()
    def progress(self, output: torch.Tensor, batch: Mapping[str, Any], ignore_index: int = 255) -> torch.Tensor:
        """Mean softmax probability of the true class (valid pixels for ``seg``): GM-Coord's progress score."""
        target = batch[self.target]
        if self.name == "cls":
            return output.float().softmax(1).gather(1, target.view(-1, 1)).mean()
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        prob = output.float().log_softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1).exp()
        n = valid.sum()
        return prob[valid].sum() / n if n > 0 else torch.tensor(float("nan"), device=prob.device)


TASKS: dict[str, Task] = {
    "cls": Task(
        "cls", "surgical activity recognition: one activity label per image", "num_activities", "label",
        metrics=(
            Metric("accuracy", True, "AC", delta_m=True),
            Metric("macro_f1", True, "F1", delta_m=True),
            Metric("weighted_f1", True, "wF1", main=False),
            Metric("compat_ac", True, "compat AC", paper="AC", beside="accuracy",
                   note="top-1 accuracy (the compat 'AC' is macro precision, tp / (column sum + 1e-8))"),
            Metric("compat_f1", True, "compat F", paper="F_score", beside="macro_f1", note="exact macro F1"),
            Metric("predicted_classes", True, "pred. classes", main=False, unit="count",
                   compute=_cls_predicted_classes),
            Metric("majority_accuracy", True, "majority AC", main=False, compute=_cls_majority_accuracy),
        )),
    "seg": Task(
        "seg", "semantic segmentation: one class per pixel (background 0)", "num_seg_classes", "mask",
        metrics=(
            Metric("miou", True, "mIoU", delta_m=True),
            Metric("miou_fg", True, "mIoU fg"),
            Metric("dice", True, "Dice", delta_m=True),
            Metric("dice_fg", True, "Dice fg", main=False),
            Metric("pixel_acc", True, "PixAcc", main=False),
            Metric("hd", False, "HD", unit="pixels", main=False),
            Metric("hd95", False, "HD95", unit="pixels", delta_m=True),
            Metric("hd_one_sided_rate", False, "HD one-sided", unit="rate", main=False),
            Metric("ssim", True, "SSIM"),
            Metric("compat_miou", True, "compat mIoU", paper="mIoU", beside="miou",
                   note="mIoU with background, absent classes left out (compat: background included, absent = 0)"),
            Metric("compat_dice", True, "compat DS", paper="DS", beside="dice",
                   note="mean Dice with background, absent left out"),
            Metric("compat_hd", False, "compat HD", paper="HD", beside="hd", paper_scale=1.0, unit="pixels",
                   note="boundary Hausdorff distance in pixels (compat: row-wise HD of the label maps, other units)"),
            Metric("compat_ssim", True, "compat SSIM", paper="SSIM", beside="ssim",
                   note="SSIM of one-hot masks per class (compat: SSIM of the class-index maps)"),
            Metric("pred_fg_fraction", True, "pred. fg", main=False, compute=_seg_pred_fg_fraction),
            Metric("true_fg_fraction", True, "true fg", main=False, compute=_seg_true_fg_fraction),
        )),
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """The registered task ``name``; ValueError listing the tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {list(TASKS)}")
    return TASKS[name]


def register_metric(task: str, metric: Metric) -> None:
    """Add (or replace) a metric of ``task``: the one edit that makes it reach result rows, tables and Delta_m."""
    t = get_task(task)
    kept = tuple(m for m in t.metrics if m.name != metric.name)
    TASKS[task] = Task(t.name, t.description, t.classes_field, t.target, kept + (metric,))


_SPLITS = ("test_", "val_", "train_")


def split_key(key: str) -> tuple[str, str, str]:
    """``"test_seg_hd95"`` -> ``("test", "seg", "hd95")``; the split is ``""`` when absent (``"seg_hd95"``)."""
    split = ""
    for prefix in _SPLITS:
        if key.startswith(prefix):
            split, key = prefix[:-1], key[len(prefix):]
            break
    task, _, name = key.partition("_")
    if task not in TASKS or not name:
        raise KeyError(f"{key!r} is not a result key of a registered task ({list(TASKS)})")
    return split, task, name


def metric_info(key: str) -> tuple[Task, Metric]:
    """The task and metric of a result key (``cls_accuracy``, ``test_seg_hd95``, ...)."""
    _, task, name = split_key(key)
    try:
        return TASKS[task], TASKS[task].metric(name)
    except KeyError:
        raise KeyError(f"{key!r}: task {task!r} declares no metric {name!r}; metrics: "
                       f"{[m.name for m in TASKS[task].metrics]}") from None


def higher_is_better(key: str) -> bool:
    """Direction of a result key (``test_seg_hd`` -> False)."""
    return metric_info(key)[1].higher_is_better


def result_keys(tasks=TASK_NAMES, split: str = "", where: Callable[[Metric], bool] | None = None) -> list[str]:
    """Result keys of ``tasks`` (optionally filtered), prefixed with ``<split>_`` when a split is given."""
    prefix = f"{split}_" if split else ""
    return [f"{prefix}{t}_{m.name}" for t in tasks for m in get_task(t).metrics if where is None or where(m)]


def main_keys(tasks=TASK_NAMES, split: str = "test") -> list[str]:
    """The keys main tables show (correct first, then ``compat_``)."""
    return result_keys(tasks, split, lambda m: m.main)


def delta_m_keys(tasks=TASK_NAMES, split: str = "test") -> dict[str, bool]:
    """``{key: higher_is_better}`` of the metrics that enter Delta_m."""
    return {k: higher_is_better(k) for k in result_keys(tasks, split, lambda m: m.delta_m)}


def paper_columns(tasks=TASK_NAMES) -> dict[str, tuple[str, Metric]]:
    """``{paper column: (task, compat metric)}`` for the metrics that sit beside the paper's tables."""
    return {m.paper: (t, m) for t in tasks for m in get_task(t).metrics if m.paper}
