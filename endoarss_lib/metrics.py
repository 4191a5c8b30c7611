"""Metrics for activity recognition, semantic segmentation and multi-label instrument presence: correct values,
and the paper-compatible ones.

Policies (``docs/metrics.md`` states them for users; this docstring is the detailed reference):

* **Fractions, not percent.** Accuracy, F1, IoU, Dice, SSIM and pixel accuracy lie in [0, 1]. Distances (``hd``,
  ``hd95``, ``compat_hd``) are in **pixels of the label maps passed in**: the evaluation resolution is whatever
  resolution the caller evaluates at, and ``compute()`` reports it under ``resolutions``.
* **Whole-set accumulation.** Confusion-matrix metrics (accuracy, F1, mIoU, Dice, pixel accuracy) come from one
  confusion matrix summed over the whole evaluated set, not from means of per-image values. Rows are the truth.
* **Exclusions, no epsilons.** A class absent from both truth and prediction in the whole set has undefined F1 / IoU /
  Dice: it is left out of the macro means and listed in ``absent_classes``. Undefined per-class values are NaN.
* **Hausdorff.** Per image and per class (background skipped by default, ``hd_classes``) between the *boundaries* of
  the predicted and true binary masks. A mask pixel is on the boundary if one of its 4 neighbours lies outside the
  mask or outside the image (``mask & ~binary_erosion(mask, cross, border_value=0)``, as medpy and MONAI do).
  ``hd`` = max of the two directed Hausdorff distances; ``hd95`` = max of the two directed 95th percentiles of the
  boundary-to-boundary distances (``np.percentile``, linear interpolation; MONAI's convention; medpy instead takes
  the percentile of both directions pooled). Both are averaged over the (image, class) pairs where the class is
  present in both maps. A pair with the class in exactly one map gets no invented distance: it is counted
  (``hd_pred_only``, ``hd_target_only``, ``hd_one_sided``) and its share reported as ``hd_one_sided_rate``.
* **SSIM.** Per image, per class present in the truth (background included): SSIM between the one-hot predicted and
  true masks with data range 1 and scikit-image's default window (7 x 7 uniform, sample covariance, K1 = 0.01,
  K2 = 0.03, a 3-pixel border strip left out); averaged over those classes, then over images. Images must be at
  least 7 x 7.
* **ignore_index.** Target pixels equal to it are left out of the confusion matrix; for HD and SSIM they belong to
  no class in either map (removed from both predicted and true masks, so they are never a boundary of their own
  but a class touching them has a boundary there); for the compat HD / SSIM the ignored target pixels take the
  prediction's value (they neither add nor remove disagreement).
* **Inputs.** numpy arrays or torch tensors (moved to CPU). A floating ``pred`` with one axis more than ``target``
  holds scores: the class axis is axis 1 of a batch ((B, K) or (B, S, H, W)), axis 0 of a single image (S, H, W),
  and it is reduced by argmax. Otherwise ``pred`` holds labels of the same shape as ``target``.
* **Multi-label presence.** Average precision per class as scikit-learn's ``average_precision_score`` (step-wise,
  no interpolation; NaN for a class with no positive, left out of the mAP); F1 per class of the labels scored at
  least 0.5, macro-averaged over the classes present in truth or prediction.
* **compat** values reproduce the authors' released evaluation so numbers can sit beside the paper's tables; they
  are not correct metrics (see ``docs/paper_vs_code.md``). Their formulas are in the docstrings of the helpers below.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.spatial.distance import directed_hausdorff
from skimage.metrics import structural_similarity

__all__ = ["ClassificationMeter", "SegmentationMeter", "MultiLabelMeter", "average_precision",
           "classification_metrics", "segmentation_metrics",
           "delta_m", "delta_m_flat", "subset_metrics", "per_activity_spread", "pil_nearest_resize"]

COMPAT_EPS = 1e-3  # the released code's epsilon in every ratio
SSIM_WINDOW = 7  # scikit-image's default uniform window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_OUTSIDE = -2  # label of the pixels beyond the image border: no class has it
_IGNORED = -1  # label of ignored pixels in the maps used for HD / SSIM: no class has it


# ---------------------------------------------------------------------------------------------------------------
# Input conversion and checks
# ---------------------------------------------------------------------------------------------------------------

def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor (any device) or nested list."""
    if _is_torch(x):
        x = x.detach()
        if x.is_floating_point():
            x = x.float()  # numpy has no bfloat16
        return x.cpu().numpy()
    return np.asarray(x)


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _as_int_labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Integer labels from an integer, boolean or integral-valued floating array."""
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr))):
            raise ValueError(f"{name} must hold integer class labels (or, for pred, scores with a class axis); "
                             f"got non-integer floating values of shape {arr.shape}")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must be a numeric array of class labels, got dtype {arr.dtype}")


def _check_class_axis(pred_shape: tuple, target_shape: tuple, num_classes: int) -> None:
    other = (pred_shape[0],) + tuple(pred_shape[2:])
    if other != tuple(target_shape):
        raise ValueError(f"pred scores of shape {tuple(pred_shape)} do not match target of shape "
                         f"{tuple(target_shape)} (expected pred = target shape with a class axis at position 1)")
    if pred_shape[1] != num_classes:
        raise ValueError(f"pred scores have {pred_shape[1]} entries on the class axis (axis 1), "
                         f"expected num_classes={num_classes}")


def _prediction_labels(pred: Any, target_shape: tuple, num_classes: int) -> np.ndarray:
    """Labels from ``pred``: argmax over axis 1 of floating scores with one axis more than target, else as given."""
    if not _is_torch(pred):
        pred = np.asarray(pred)
    is_scores = pred.is_floating_point() if _is_torch(pred) else pred.dtype.kind == "f"
    if is_scores and len(pred.shape) == len(target_shape) + 1:
        _check_class_axis(tuple(pred.shape), target_shape, num_classes)
        if _is_torch(pred):
            pred = pred.detach()
            if not bool(pred.isfinite().all()):
                raise ValueError("pred scores contain NaN or infinite values")
            return pred.argmax(dim=1).cpu().numpy().astype(np.int64)  # argmax on the device: less to move
        if not np.isfinite(pred).all():
            raise ValueError("pred scores contain NaN or infinite values")
        return pred.argmax(axis=1).astype(np.int64)
    labels = _as_int_labels(_to_numpy(pred), "pred")
    if labels.shape != tuple(target_shape):
        raise ValueError(f"pred of shape {labels.shape} does not match target of shape {tuple(target_shape)}; "
                         f"expected labels of the same shape, or floating scores with a class axis at position 1")
    return labels


def _check_label_range(labels: np.ndarray, name: str, num_classes: int, ignore_index: int | None = None,
                       hint: str = "") -> None:
    checked = labels if ignore_index is None else labels[labels != ignore_index]
    if checked.size and (checked.min() < 0 or checked.max() >= num_classes):
        bad = checked[(checked < 0) | (checked >= num_classes)]
        allowed = f"0..{num_classes - 1}" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name} holds labels outside {allowed}: e.g. {sorted(set(bad[:10].tolist()))}{hint}")


def _add_leading_axis(x: Any) -> Any:
    return x[None] if (_is_torch(x) or isinstance(x, np.ndarray)) else np.asarray(x)[None]


def _confusion(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows = truth) of two flat label arrays with values in 0..num_classes-1."""
    flat = target.ravel() * num_classes + pred.ravel()
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Small numeric helpers
# ---------------------------------------------------------------------------------------------------------------

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0 (an undefined value, never a guessed one)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _mean(values: np.ndarray) -> float:
    """Mean of a possibly empty array: NaN when empty."""
    return float(np.mean(values)) if np.size(values) else float("nan")


def _scalar_ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------

COMPAT_AC_EPS = 1e-8  # the released Evaluator's self.eps, used by Pixel_Accuracy_Class (its "Acc")


def _compat_classification(cm: np.ndarray) -> dict:
    """The released test's "Acc" and "F-score" over ALL classes (``LibMTL/eva.py``, ``trainer.mtl_test``).

    "Acc" is ``Pixel_Accuracy_Class().mean()``: per class ``tp / (column sum + 1e-8)`` with the confusion matrix
    indexed (truth, prediction), i.e. the macro **precision**, not an accuracy. "F-score" is the macro mean of
    ``2PR / (P + R + 1e-3)`` with ``P = tp / (tp + fp + 1e-3)`` and ``R = tp / (tp + fn + 1e-3)``."""
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    pixel_accuracy_class = tp / (cm.sum(0) + COMPAT_AC_EPS)
    precision = tp / (tp + fp + COMPAT_EPS)
    recall = tp / (tp + fn + COMPAT_EPS)
    f1 = 2 * precision * recall / (precision + recall + COMPAT_EPS)
    return {"compat_ac": float(pixel_accuracy_class.mean()), "compat_f1": float(f1.mean())}


def _classification_from_confusion(cm: np.ndarray) -> dict:
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    fp, fn = predicted - tp, support - tp
    absent = (support == 0) & (predicted == 0)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)  # NaN exactly for absent classes
    n = int(cm.sum())
    return {
        "accuracy": _scalar_ratio(tp.sum(), n),
        "macro_f1": _mean(f1[~absent]),
        "weighted_f1": _scalar_ratio((f1[support > 0] * support[support > 0]).sum(), n),
        **_compat_classification(cm),
        "per_class": {"precision": _ratio(tp, predicted), "recall": _ratio(tp, support), "f1": f1,
                      "support": support.copy()},
        "confusion": cm.copy(),
        "absent_classes": np.flatnonzero(absent).tolist(),
        "num_samples": n,
    }


class ClassificationMeter:
    """Accumulates the activity confusion matrix batch by batch; ``compute()`` gives the classification metrics."""

    def __init__(self, num_classes: int):
        self.num_classes = _check_num_classes(num_classes)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: target labels (B,), pred labels (B,) or floating scores (B, K) (argmax over axis 1)."""
        if np.ndim(target) == 0:  # one sample
            target, pred = _add_leading_axis(target), _add_leading_axis(pred)
        target = _as_int_labels(_to_numpy(target), "target")
        if target.ndim != 1:
            raise ValueError(f"target must be a 1-D array of class labels (B,), got shape {target.shape}")
        labels = _prediction_labels(pred, target.shape, self.num_classes)
        _check_label_range(target, "target", self.num_classes)
        _check_label_range(labels, "pred", self.num_classes)
        self.confusion += _confusion(target, labels, self.num_classes)

    def compute(self) -> dict:
        """Accuracy, exact macro / weighted F1, compat AC / F1, per-class values, confusion, absent classes."""
        return _classification_from_confusion(self.confusion)


def classification_metrics(y_true: Any, y_pred: Any, num_classes: int) -> dict:
    """Classification metrics of one whole set (sklearn argument order: truth first)."""
    meter = ClassificationMeter(num_classes)
    meter.update(y_pred, y_true)
    return meter.compute()


# ---------------------------------------------------------------------------------------------------------------
# Multi-label (instrument presence)
# ---------------------------------------------------------------------------------------------------------------

def average_precision(scores: Any, target: Any) -> float:
    """Average precision of one class: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds in decreasing
    order (no interpolation; scikit-learn's ``average_precision_score``). NaN when the class has no positive."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    target = np.asarray(target).ravel().astype(bool)
    positives = int(target.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], target[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last sample at each distinct threshold
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class MultiLabelMeter:
    """Accumulates multi-label scores and 0/1 targets (B, C) batch by batch; ``compute()`` gives per-class average
    precision and its mean (mAP), and per-class / macro F1 of the labels whose score is at least ``threshold``.

    Scores are probabilities (or any scores where ``threshold`` means "present"). A class without a positive in the
    whole set has an undefined AP (NaN, left out of the mAP and listed in ``absent_classes``); a class absent from both
    truth and prediction has an undefined F1 (NaN, left out of the macro F1), as for single-label F1 above.
    ``chance_map``: the mAP of a constant score (each class's AP is then its prevalence): the floor a model must beat.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes, self.threshold = int(num_classes), float(threshold)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._scores: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def update(self, scores: Any, target: Any) -> None:
        """Add a batch: scores (B, C) (floating) and targets (B, C) in {0, 1}."""
        scores, target = _to_numpy(scores).astype(np.float64), _to_numpy(target)
        if scores.ndim == 1 and target.ndim == 1:  # one sample
            scores, target = scores[None], target[None]
        if target.ndim != 2 or target.shape[1] != self.num_classes:
            raise ValueError(f"target must be (B, C={self.num_classes}) 0/1 labels, got shape {target.shape}")
        if scores.shape != target.shape:
            raise ValueError(f"scores of shape {scores.shape} do not match target of shape {target.shape}")
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinite values")
        if not np.isin(target, (0, 1)).all():
            raise ValueError("target must hold 0/1 labels")
        self._scores.append(scores)
        self._targets.append(target.astype(bool))

    def compute(self) -> dict:
        """Per-class AP, mAP, per-class and macro F1 at ``threshold``, prevalence, chance mAP, predicted sets."""
        c = self.num_classes
        scores = np.concatenate(self._scores) if self._scores else np.zeros((0, c))
        target = np.concatenate(self._targets) if self._targets else np.zeros((0, c), bool)
        ap = np.array([average_precision(scores[:, k], target[:, k]) for k in range(c)])
        pred = scores >= self.threshold
        tp, fp, fn = (pred & target).sum(0), (pred & ~target).sum(0), (~pred & target).sum(0)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        support = target.sum(0)
        prevalence = _ratio(support, np.full(c, target.shape[0]))
        has_positive = support > 0
        return {"map": _mean(ap[has_positive]), "ap_per_class": ap, "macro_f1": _mean(f1[np.isfinite(f1)]),
                "f1_per_class": f1, "prevalence": prevalence, "chance_map": _mean(prevalence[has_positive]),
                "predicted_sets": float(len({row.tobytes() for row in pred})) if len(pred) else float("nan"),
                "support": support, "absent_classes": np.flatnonzero(~has_positive).tolist(),
                "num_samples": int(target.shape[0])}


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: per-image pieces
# ---------------------------------------------------------------------------------------------------------------

def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label or outside the image: the boundary of every class mask at once."""
    padded = np.pad(labels, 1, constant_values=_OUTSIDE)
    centre = padded[1:-1, 1:-1]
    return ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
            | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))


def _directed_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each pixel of non-empty boundary ``a`` to ``b`` and from ``b`` to ``a``, in pixels."""
    # Cropping to the joint bounding box is exact (every nearest point lies inside it) and makes small objects cheap.
    rows = np.flatnonzero(a.any(1) | b.any(1))
    cols = np.flatnonzero(a.any(0) | b.any(0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a, b = a[window], b[window]
    # EDT of the complement: at every pixel, the distance to the nearest boundary pixel (not O(N^2) point pairs).
    return distance_transform_edt(~b)[a], distance_transform_edt(~a)[b]


def _boundary_hausdorff(pred_boundary: np.ndarray, target_boundary: np.ndarray) -> tuple[float, float]:
    """(HD, HD95) of two non-empty boundaries: max of the directed maxima / of the directed 95th percentiles."""
    d_pt, d_tp = _directed_distances(pred_boundary, target_boundary)
    hd = max(d_pt.max(), d_tp.max())
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    return float(hd), float(hd95)


def _window_sums(masks: np.ndarray) -> np.ndarray:
    """Sum of each fully-inside SSIM_WINDOW x SSIM_WINDOW window of each boolean plane of (C, H, W)."""
    # Shift-and-add in uint8 (a sum is at most 49): exact, and an order of magnitude faster than a cumsum.
    w, planes = SSIM_WINDOW, masks.view(np.uint8)
    rows = planes.shape[1] - w + 1
    by_rows = planes[:, :rows].copy()
    for k in range(1, w):
        by_rows += planes[:, k:k + rows]
    cols = planes.shape[2] - w + 1
    sums = by_rows[:, :, :cols].copy()
    for k in range(1, w):
        sums += by_rows[:, :, k:k + cols]
    return sums


def _onehot_ssim(pred: np.ndarray, target: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """SSIM per class of the one-hot masks (data range 1), as scikit-image computes it with its default window."""
    x = target[None] == classes[:, None, None]
    y = pred[None] == classes[:, None, None]
    # scikit-image filters everywhere and then drops the (window-1)/2 border strip; what remains are exactly the
    # windows lying fully inside the image, so only those are summed (integer sums of 0/1 masks: exact).
    sx, sy, sxy = (_window_sums(m) for m in (x, y, x & y))
    n_window = SSIM_WINDOW ** 2
    # A window where both masks are the same constant scores exactly 1 (c1 c2 / c1 c2): evaluate the rest only.
    trivial = (sx == sy) & ((sx == 0) | (sx == n_window))
    busy = ~trivial
    ux, uy, uxy = (sums[busy] / n_window for sums in (sx, sy, sxy))
    cov_norm = n_window / (n_window - 1)  # scikit-image's default sample covariance
    vx, vy = cov_norm * (ux - ux * ux), cov_norm * (uy - uy * uy)  # a 0/1 mask is its own square
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = _SSIM_K1 ** 2, _SSIM_K2 ** 2  # data range 1
    scores = np.ones(sx.shape)
    scores[busy] = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return scores.mean(axis=(1, 2), dtype=np.float64)


def _pil_nearest_index(n: int, out: int) -> np.ndarray:
    # Pillow resizes with NEAREST through an affine transform that ACCUMULATES the step (xx += n / out, starting at
    # half a step) in double precision and truncates; a closed form floor((x + 0.5) * n / out) differs where the
    # accumulated value falls just below an integer. Summing in the same order reproduces Pillow exactly.
    steps = np.full(out, n / out)
    steps[0] = n / out * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), n - 1)


def pil_nearest_resize(labels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A label map (H, W) resized as ``PIL.Image.resize((w, h), Image.NEAREST)`` does (the released evaluation's
    resizing of masks to 244 x 244), bit for bit; ``size`` is an int or (height, width)."""
    oh, ow = (size, size) if isinstance(size, (int, np.integer)) else size
    h, w = labels.shape[-2:]
    return labels[..., _pil_nearest_index(h, oh)[:, None], _pil_nearest_index(w, ow)[None, :]]


def _compat_hausdorff(pred: np.ndarray, target: np.ndarray) -> float:
    """The released "HD": each ROW of a label map is one W-dimensional point; symmetric Hausdorff of the row sets."""
    p, t = pred.astype(np.float64), target.astype(np.float64)
    return float(max(directed_hausdorff(t, p)[0], directed_hausdorff(p, t)[0]))


def _compat_ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """The released "SSIM": scikit-image on uint8 class-index maps, data range of the prediction; NaN if constant."""
    p, t = pred.astype(np.uint8), target.astype(np.uint8)
    data_range = int(p.max()) - int(p.min())
    if data_range == 0:
        return float("nan")  # the released code's SSIM is NaN here, and it drops NaNs
    return float(structural_similarity(t, p, data_range=data_range))


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: meter
# ---------------------------------------------------------------------------------------------------------------

def _segmentation_from_confusion(cm: np.ndarray) -> dict:
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    absent = (tp + fp + fn) == 0
    iou, dice = _ratio(tp, tp + fp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
    foreground = np.arange(len(tp)) > 0
    tpf = tp.astype(np.float64)
    return {
        "miou": _mean(iou[~absent]),
        "miou_fg": _mean(iou[~absent & foreground]),
        "dice": _mean(dice[~absent]),
        "dice_fg": _mean(dice[~absent & foreground]),
        "pixel_acc": _scalar_ratio(tp.sum(), cm.sum()),
        "iou_per_class": iou,
        "dice_per_class": dice,
        "absent_classes": np.flatnonzero(absent).tolist(),
        # the released formulas: 1e-3 epsilon, mean over ALL classes with background, absent classes score 0
        "compat_miou": float(np.mean(tpf / (tpf + fp + fn + COMPAT_EPS))),
        "compat_dice": float(np.mean(2 * tpf / (2 * tpf + fp + fn + COMPAT_EPS))),
        "confusion": cm.copy(),
        "num_pixels": int(cm.sum()),
    }


class SegmentationMeter:
    """Accumulates segmentation metrics over a whole set batch by batch, in memory that does not grow with the set.

    ``hd_classes``: classes whose Hausdorff distance is measured (default: all but background 0).
    ``compute_distances=False`` skips HD and compat HD (reported as NaN, counts 0); ``compute_ssim=False`` likewise
    skips SSIM and compat SSIM. ``compat_size``: the ``compat_`` values (mIoU, Dice, HD, SSIM) are computed on the
    predicted and true label maps resized to ``compat_size`` x ``compat_size`` with PIL's nearest resizing, as the
    released evaluation does at 244 x 244 whatever the model's input size (None: at the maps' own size).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, hd_classes: Iterable[int] | None = None,
                 compute_distances: bool = True, compute_ssim: bool = True, compat_size: int | None = None):
        if compat_size is not None and (isinstance(compat_size, bool) or not isinstance(compat_size, (int, np.integer))
                                        or compat_size < 1):
            raise ValueError(f"compat_size must be None or a positive int, got {compat_size!r}")
        self.compat_size = None if compat_size is None else int(compat_size)
        self.num_classes = _check_num_classes(num_classes)
        if ignore_index is not None and (isinstance(ignore_index, bool)
                                         or not isinstance(ignore_index, (int, np.integer))):
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.hd_classes = self._checked_hd_classes(hd_classes)
        self.compute_distances = bool(compute_distances)
        self.compute_ssim = bool(compute_ssim)
        self.reset()

    def _checked_hd_classes(self, hd_classes: Iterable[int] | None) -> np.ndarray:
        if hd_classes is None:
            return np.arange(1, self.num_classes)
        classes = np.unique(np.asarray(list(hd_classes), dtype=np.int64))
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"hd_classes must be classes in 0..{self.num_classes - 1}, got {classes.tolist()}")
        return classes

    def reset(self) -> None:
        """Forget everything accumulated."""
        k = self.num_classes
        self.confusion = np.zeros((k, k), dtype=np.int64)
        self.compat_confusion = np.zeros((k, k), dtype=np.int64)  # at compat_size (== confusion without it)
        self._hd_sum, self._hd95_sum = np.zeros(k), np.zeros(k)
        self._hd_pairs = np.zeros(k, dtype=np.int64)
        self._pred_only = np.zeros(k, dtype=np.int64)
        self._target_only = np.zeros(k, dtype=np.int64)
        self._ssim_sum, self._ssim_images = 0.0, 0
        self._compat_hd_sum, self._compat_hd_images = 0.0, 0
        self._compat_ssim_sum, self._compat_ssim_images, self._compat_ssim_skipped = 0.0, 0, 0
        self._num_images = 0
        self._resolutions: set[tuple[int, int]] = set()

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: target (N, H, W) or (H, W) labels; pred labels of that shape or floating scores with a class
        axis ((N, S, H, W) / (S, H, W), argmax over it)."""
        if np.ndim(target) == 2:  # one image
            target, pred = _add_leading_axis(target), _add_leading_axis(pred)
        target = _as_int_labels(_to_numpy(target), "target")
        if target.ndim != 3:
            raise ValueError(f"target must be a label map (H, W) or a batch (N, H, W), got shape {target.shape}")
        labels = _prediction_labels(pred, target.shape, self.num_classes)
        void_hint = "" if self.ignore_index is not None else " (pass ignore_index for a void label)"
        _check_label_range(target, "target", self.num_classes, self.ignore_index, hint=void_hint)
        _check_label_range(labels, "pred", self.num_classes)
        if self.compute_ssim and min(target.shape[1:]) < SSIM_WINDOW:
            raise ValueError(f"target images of size {target.shape[1:]} are smaller than the {SSIM_WINDOW}x"
                             f"{SSIM_WINDOW} SSIM window; pass compute_ssim=False to skip SSIM")
        valid = np.ones(target.shape, bool) if self.ignore_index is None else target != self.ignore_index
        self.confusion += _confusion(target[valid], labels[valid], self.num_classes)
        for p, t, v in zip(labels, target, valid):
            self._update_image(p, t, v)

    def _update_image(self, pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> None:
        self._num_images += 1
        self._resolutions.add(tuple(int(s) for s in target.shape))
        # Ignored pixels belong to no class in either map (HD, SSIM) ...
        pred_m, target_m = np.where(valid, pred, _IGNORED), np.where(valid, target, _IGNORED)
        # ... and take the prediction's value in the compat maps (the released code knows no ignore label).
        if self.compat_size is None:
            pred_c, target_c = pred, np.where(valid, target, pred)
            self.compat_confusion += _confusion(target[valid], pred[valid], self.num_classes)
        else:
            pred_c, target_r = (pil_nearest_resize(x, self.compat_size) for x in (pred, target))
            valid_c = np.ones(target_r.shape, bool) if self.ignore_index is None else target_r != self.ignore_index
            target_c = np.where(valid_c, target_r, pred_c)
            self.compat_confusion += _confusion(target_r[valid_c], pred_c[valid_c], self.num_classes)
        if self.compute_distances:
            self._update_hausdorff(pred_m, target_m)
            self._compat_hd_sum += _compat_hausdorff(pred_c, target_c)
            self._compat_hd_images += 1
        if self.compute_ssim:
            self._update_ssim(pred_m, target_m)
            value = _compat_ssim(pred_c, target_c)
            if np.isnan(value):
                self._compat_ssim_skipped += 1
            else:
                self._compat_ssim_sum += value
                self._compat_ssim_images += 1

    def _presence(self, labels_m: np.ndarray) -> np.ndarray:
        return np.bincount(labels_m[labels_m >= 0], minlength=self.num_classes) > 0

    def _update_hausdorff(self, pred_m: np.ndarray, target_m: np.ndarray) -> None:
        in_pred, in_target = self._presence(pred_m), self._presence(target_m)
        pred_edges, target_edges = _boundaries(pred_m), _boundaries(target_m)
        for c in self.hd_classes:
            if in_pred[c] and in_target[c]:
                hd, hd95 = _boundary_hausdorff(pred_edges & (pred_m == c), target_edges & (target_m == c))
                self._hd_sum[c] += hd
                self._hd95_sum[c] += hd95
                self._hd_pairs[c] += 1
            elif in_pred[c]:
                self._pred_only[c] += 1
            elif in_target[c]:
                self._target_only[c] += 1

    def _update_ssim(self, pred_m: np.ndarray, target_m: np.ndarray) -> None:
        classes = np.flatnonzero(self._presence(target_m))
        if classes.size:  # an image with every pixel ignored has no class to score
            self._ssim_sum += float(_onehot_ssim(pred_m, target_m, classes).mean())
            self._ssim_images += 1

    def compute(self) -> dict:
        """mIoU / Dice (with and without background), pixel accuracy, HD / HD95, SSIM, compat values, counts."""
        out = _segmentation_from_confusion(self.confusion)
        compat = _segmentation_from_confusion(self.compat_confusion)
        out["compat_miou"], out["compat_dice"] = compat["compat_miou"], compat["compat_dice"]
        out["compat_size"] = self.compat_size
        pairs, one_sided = int(self._hd_pairs.sum()), int(self._pred_only.sum() + self._target_only.sum())
        out.update({
            "hd": _scalar_ratio(self._hd_sum.sum(), pairs),
            "hd95": _scalar_ratio(self._hd95_sum.sum(), pairs),
            "hd_per_class": _ratio(self._hd_sum, self._hd_pairs),
            "hd95_per_class": _ratio(self._hd95_sum, self._hd_pairs),
            "hd_classes": self.hd_classes.tolist(),
            "hd_pairs": pairs,
            "hd_pred_only": int(self._pred_only.sum()),
            "hd_target_only": int(self._target_only.sum()),
            "hd_one_sided": one_sided,
            "hd_one_sided_rate": _scalar_ratio(one_sided, pairs + one_sided),
            "ssim": _scalar_ratio(self._ssim_sum, self._ssim_images),
            "ssim_images": self._ssim_images,
            "compat_hd": _scalar_ratio(self._compat_hd_sum, self._compat_hd_images),
            "compat_hd_images": self._compat_hd_images,
            "compat_ssim": _scalar_ratio(self._compat_ssim_sum, self._compat_ssim_images),
            "compat_ssim_images": self._compat_ssim_images,
            "compat_ssim_skipped": self._compat_ssim_skipped,
            "num_images": self._num_images,
            "resolutions": sorted(self._resolutions),
        })
        return out


def segmentation_metrics(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None,
                         hd_classes: Iterable[int] | None = None, compute_distances: bool = True,
                         compute_ssim: bool = True, compat_size: int | None = None) -> dict:
    """Segmentation metrics of one whole set of label maps (H, W) / (N, H, W) (see ``SegmentationMeter``)."""
    meter = SegmentationMeter(num_classes, ignore_index=ignore_index, hd_classes=hd_classes,
                              compute_distances=compute_distances, compute_ssim=compute_ssim,
                              compat_size=compat_size)
    meter.update(pred, target)
    return meter.compute()


# ---------------------------------------------------------------------------------------------------------------
# Multi-task gain
# ---------------------------------------------------------------------------------------------------------------

def _relative_gains(mtl: Mapping[str, float], single: Mapping[str, float],
                    higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    if not higher_is_better:
        raise ValueError("higher_is_better must name at least one metric")
    gains = {}
    for name, higher in higher_is_better.items():
        for arg, results in (("mtl", mtl), ("single", single)):
            if name not in results:
                raise ValueError(f"{arg} has no value for metric {name!r} named in higher_is_better")
            if not np.isfinite(results[name]):
                raise ValueError(f"{arg}[{name!r}] is {results[name]}; delta_m needs finite values")
        if single[name] == 0:
            raise ValueError(f"single[{name!r}] is 0: the relative gain is undefined")
        sign = 1.0 if higher else -1.0  # LibMTL's (-1)**w with w = 1 for higher-is-better: (N - B) / B
        gains[name] = sign * (float(mtl[name]) - float(single[name])) / float(single[name])
    return gains


def delta_m(mtl: Mapping[str, float], single: Mapping[str, float], higher_is_better: Mapping[str, bool],
            tasks: Mapping[str, str] | None = None) -> float:
    """Relative multi-task gain, LibMTL's ``count_improvement``: the relative gains ``+-(mtl - single) / single``
    (sign flipped for lower-is-better metrics) are averaged **within each task, then over tasks**, as a fraction.

    Each metric's task is its ``<task>_`` prefix (``cls_accuracy``, ``test_seg_miou``) unless ``tasks`` maps metric
    names to tasks. With two activity metrics at +2 % and three segmentation metrics at -1 %, this gives +0.5 %
    (each task counts once); the flat mean over metrics (:func:`delta_m_flat`) would give +0.2 %.
    """
    from .tasks import split_key  # the one parser of result keys (tasks imports this module: imported here)

    gains = _relative_gains(mtl, single, higher_is_better)
    by_task: dict[str, list[float]] = {}
    for name, gain in gains.items():
        by_task.setdefault(tasks[name] if tasks is not None else split_key(name, registered=False)[1], []).append(gain)
    return float(np.mean([np.mean(v) for v in by_task.values()]))


def delta_m_flat(mtl: Mapping[str, float], single: Mapping[str, float], higher_is_better: Mapping[str, bool]
                 ) -> float:
    """The flat mean of the relative gains over all metrics (every metric counts once, so the task with more metrics
    weighs more). Not LibMTL's definition: :func:`delta_m` is."""
    return float(np.mean(list(_relative_gains(mtl, single, higher_is_better).values())))


# ---------------------------------------------------------------------------------------------------------------
# Subsets and spreads
# ---------------------------------------------------------------------------------------------------------------

def subset_metrics(confusion: np.ndarray, ids: Iterable[int]) -> dict[str, float]:
    """Mean IoU and Dice over a subset of classes from a (truth x prediction) confusion matrix; classes absent from
    both truth and prediction are left out (NaN-safe)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    ids = list(ids)
    iou, dice = _ratio(tp, tp + fp + fn)[ids], _ratio(2 * tp, 2 * tp + fp + fn)[ids]
    return {"miou": _mean(iou[np.isfinite(iou)]), "dice": _mean(dice[np.isfinite(dice)])}


def per_activity_spread(images: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Spreads over activity classes from per-image records (``label``, ``correct``, ``fg_inter``, ``fg_union``,
    ``fg_iou``; :func:`endoarss_lib.training.engine.evaluate` with ``per_image=True``):

    * ``cls_per_class_accuracy_std``: standard deviation over activities of per-activity accuracy (recall);
    * ``seg_fg_iou_std``: standard deviation over activities of the foreground-vs-background IoU pooled over each
      activity's images (ignored pixels are neither foreground nor background);
    * ``seg_fg_iou_std_images``: standard deviation over images of the per-image foreground IoU, as the released
      code computes the paper's Table V "+-" (images without foreground on either side left out).

    Population standard deviations (ddof 0), as ``numpy.std``.
    """
    out: dict[str, float] = {}
    labels = sorted({int(r["label"]) for r in images})
    if images and "correct" in images[0]:
        acc = [np.mean([bool(r["correct"]) for r in images if r["label"] == k]) for k in labels]
        out["cls_per_class_accuracy_std"] = float(np.std(acc))
    if images and "fg_union" in images[0]:
        pooled = []
        for k in labels:
            inter = sum(r["fg_inter"] for r in images if r["label"] == k)
            union = sum(r["fg_union"] for r in images if r["label"] == k)
            if union:
                pooled.append(inter / union)
        out["seg_fg_iou_std"] = float(np.std(pooled)) if pooled else float("nan")
        per_image = [r["fg_iou"] for r in images if r["fg_union"]]
        out["seg_fg_iou_std_images"] = float(np.std(per_image)) if per_image else float("nan")
    return out
