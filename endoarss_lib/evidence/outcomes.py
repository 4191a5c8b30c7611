"""Metrics recomputed from a run's per-image test outcomes (``test_per_image.npz``, written by ``engine.fit``), on
any subset or resample of the test images: what paired bootstrap intervals need.

The numbers are the library's own definitions (:mod:`endoarss_lib.metrics`: the confusion matrices of the resampled
images, summed, then the same formulas as the result rows), so on all images they equal the run's ``test_`` values.

Keys (without the ``test_`` prefix): ``<task>_<metric>`` of a single-label task (``cls_accuracy``,
``cls_macro_f1``, ...) or a dense task (``seg_miou``, ``seg_miou_fg``, ``seg_dice``, ``seg_pixel_acc``), and per
class or pair of classes of a dense task (names as in the dataset spec):

* ``seg_iou_<class>``: the IoU of one class;
* ``seg_pair_iou_<a>__<b>``: the mean IoU of two classes;
* ``seg_miou_eval``: the mean IoU over a subset of classes (``seg_eval_classes`` in the outcomes, set by
  :func:`restrict_outcomes`; IoU from the whole confusion, as :func:`~endoarss_lib.metrics.subset_metrics`);
* ``seg_swap_<a>__<b>``: the share of the pair's found pixels given the other class of the pair: of the pixels
  whose truth is ``a`` or ``b`` and whose prediction is ``a`` or ``b``, those predicted as the other one (lower is
  better; NaN when no pixel is found).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..metrics import _classification_from_confusion, _segmentation_from_confusion, subset_metrics

__all__ = ["outcome_value", "outcome_higher_is_better", "swap_rate", "pair_names", "OutcomeKeyError",
           "restrict_outcomes"]


class OutcomeKeyError(KeyError):
    """A key that per-image outcomes cannot give (unknown metric, class or task)."""

    def __str__(self) -> str:
        return str(self.args[0])


_SINGLE = {"accuracy": True, "macro_f1": True, "weighted_f1": True}
_DENSE = {"miou": True, "miou_fg": True, "dice": True, "dice_fg": True, "pixel_acc": True}


def pair_names(text: str) -> tuple[str, str]:
    """``"fluid_bleb__exposed_submucosa"`` -> ``("fluid_bleb", "exposed_submucosa")``."""
    a, sep, b = text.partition("__")
    if not sep or not a or not b:
        raise OutcomeKeyError(f"{text!r}: expected two class names joined by '__' (a__b)")
    return a, b


def swap_rate(confusion: np.ndarray, a: int, b: int) -> float:
    """Of the pixels of true class ``a`` or ``b`` predicted as ``a`` or ``b``, the share predicted as the other one."""
    found = confusion[a, a] + confusion[a, b] + confusion[b, a] + confusion[b, b]
    return float((confusion[a, b] + confusion[b, a]) / found) if found else float("nan")


def _split(key: str, arrays: Mapping[str, np.ndarray]) -> tuple[str, str]:
    for prefix in ("test_",):
        if key.startswith(prefix):
            key = key[len(prefix):]
    for name in sorted({k.split("_", 1)[0] for k in arrays}, key=len, reverse=True):
        if key.startswith(name + "_"):
            return name, key[len(name) + 1:]
    tasks = sorted({k.split("_", 1)[0] for k in arrays if not k == "path"})
    raise OutcomeKeyError(f"{key!r}: no per-image outcomes of its task (tasks with outcomes: {tasks})")


def _class_index(name: str, class_names: Sequence[str] | None, key: str) -> int:
    if class_names is None or name not in class_names:
        raise OutcomeKeyError(f"{key!r}: unknown class {name!r}; classes: {list(class_names or [])}")
    return list(class_names).index(name)


def outcome_higher_is_better(key: str) -> bool:
    """Direction of an outcome key (the swap rate is the only lower-is-better one)."""
    return "_swap_" not in key


def outcome_value(arrays: Mapping[str, np.ndarray], key: str, idx: np.ndarray | None = None,
                  class_names: Sequence[str] | None = None) -> float:
    """The metric ``key`` over the test images ``idx`` (default: all; repeats count repeatedly, as a bootstrap
    resample does). ``class_names``: the dense task's class names (for ``_iou_<class>``, ``_swap_<a>__<b>``)."""
    task, metric = _split(key, arrays)
    if f"{task}_confusion" in arrays:
        conf = arrays[f"{task}_confusion"]
        total = (conf if idx is None else conf[idx]).sum(0)
        if metric in _SINGLE:  # per-image confusions of a single-label task (outcomes pooled over conditions)
            return float(_classification_from_confusion(total)[metric])
        if metric in _DENSE:
            return float(_segmentation_from_confusion(total)[metric])
        if metric == "miou_eval":
            if f"{task}_eval_classes" not in arrays:
                raise OutcomeKeyError(f"{key!r}: no class subset in the outcomes (restrict_outcomes(..., classes=))")
            return float(subset_metrics(total, arrays[f"{task}_eval_classes"].tolist())["miou"])
        if metric.startswith("iou_"):
            c = _class_index(metric[4:], class_names, key)
            return float(_segmentation_from_confusion(total)["iou_per_class"][c])
        if metric.startswith("pair_iou_"):
            a, b = (_class_index(n, class_names, key) for n in pair_names(metric[len("pair_iou_"):]))
            iou = _segmentation_from_confusion(total)["iou_per_class"]
            return float(np.mean([iou[a], iou[b]]))
        if metric.startswith("swap_"):
            a, b = (_class_index(n, class_names, key) for n in pair_names(metric[len("swap_"):]))
            return swap_rate(total, a, b)
        raise OutcomeKeyError(f"{key!r}: dense outcomes give {sorted(_DENSE)}, iou_<class>, pair_iou_<a>__<b>, "
                              "swap_<a>__<b>")
    if f"{task}_pred" in arrays:
        true, pred = arrays[f"{task}_true"], arrays[f"{task}_pred"]
        if idx is not None:
            true, pred = true[idx], pred[idx]
        k = int(arrays[f"{task}_prob"].shape[1]) if f"{task}_prob" in arrays else int(max(true.max(), pred.max()) + 1)
        if metric not in _SINGLE:
            raise OutcomeKeyError(f"{key!r}: single-label outcomes give {sorted(_SINGLE)}")
        cm = np.bincount(true.astype(np.int64) * k + pred.astype(np.int64), minlength=k * k).reshape(k, k)
        return float(_classification_from_confusion(cm)[metric])
    raise OutcomeKeyError(f"{key!r}: task {task!r} has no per-image outcomes this module can score")


def restrict_outcomes(arrays: Mapping[str, np.ndarray], labels: Sequence[int] | None = None, label_task: str = "cls",
                      classes: Sequence[int] | None = None, dense_task: str = "seg") -> dict[str, np.ndarray]:
    """Outcomes compared like with like on another test set (paper Table IV): only the images whose
    ``label_task`` truth is in ``labels`` (every per-image array filtered alike), and ``classes`` recorded as the
    dense task's evaluated subset (``<dense_task>_miou_eval``)."""
    out = dict(arrays)
    if labels is not None:
        keep = np.isin(arrays[f"{label_task}_true"], list(labels))
        n = len(keep)
        out = {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == n else v)
               for k, v in out.items()}
    if classes is not None:
        out[f"{dense_task}_eval_classes"] = np.asarray(list(classes), dtype=np.int64)
    return out
