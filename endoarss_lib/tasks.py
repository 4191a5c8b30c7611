"""The task registry (in the spirit of LibMTL's ``task_dict``): each task is an object that carries everything the
rest of the package needs to know about it.

A :class:`Task` holds its name, the batch key of its ground truth (``target``, or ``derive_target`` when the target
is computed from the batch), the dataset-spec attribute holding its class count (``classes_field``), its loss
function, meter factory, head factory (and how the head reads the features), how logits become predictions, its
result metrics (:class:`Metric`, with direction, paper column, ``headline`` and ``needs_distances`` flags), the floor
a model must beat (``prior``: what a prior predictor scores, :class:`Check`) and the rules that call a model
degenerate (``degenerate``). The engine's training step and evaluation, the model builder, the configuration,
result rows, Delta_m, the paper comparison and the robustness tables read this module and never test task names.

Adding a task is one :func:`register_task` call (``docs/tasks.md`` walks through it); adding a metric to a task is
one :func:`register_metric` call (with ``compute`` if the meter does not already return it under that name).

Result keys are ``<task>_<metric>`` (``cls_accuracy``, ``seg_hd95``); result rows prefix the split
(``test_seg_miou``, ``val_cls_accuracy``). :func:`split_key` parses any such key, :func:`metric_info` resolves it.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import ClassificationMeter, MultiLabelMeter, SegmentationMeter, subset_metrics

__all__ = ["Metric", "Task", "Check", "LossOptions", "MeterOptions", "HeadSpec", "EvalSubset", "TASKS", "TASK_NAMES",
           "DEFAULT_TASKS", "get_task", "register_task", "unregister_task", "register_metric", "check_tasks",
           "metric_info", "higher_is_better", "result_keys", "split_key", "delta_m_keys", "main_keys",
           "headline_keys", "paper_columns", "add_targets", "ResultKeyError", "IMAGE_CLASSIFICATION",
           "DENSE_SEGMENTATION", "classification_head", "segmentation_head", "forward_image_head",
           "forward_dense_head", "presence_from_masks"]

DEFAULT_TASKS = ("cls", "seg")  # the paper's two tasks: the default of every model, table and grid


@dataclass(frozen=True)
class Metric:
    """One result metric of a task.

    ``name``: key in the task's meter output (and the result key after ``<task>_``); ``higher_is_better``: its
    direction (model selection, Delta_m, best-per-column highlighting); ``label``: short table label; ``paper``:
    the paper's table column this value reproduces (the ``compat_`` metrics: the released formulas under the
    paper's names), ``beside``: the correct metric shown next to it, ``paper_scale``: factor to the paper's units,
    ``note``: what the correct metric means against the compat one; ``delta_m``: enters the multi-task gain;
    ``main``: shown in the main tables; ``unit``: ``fraction`` (0..1), ``pixels``, ``rate`` or ``count``;
    ``compute``: ``meter values -> float`` when the meter has no key ``name``; ``headline``: the task's one number
    (model selection's ``score`` averages the headline metrics of the trained tasks); ``needs_distances``: only
    computed when the evaluation computes boundary distances / SSIM (``distances=True``); ``quality``: False for a
    number that describes the data or the prediction (a share, a count, what a constant predictor scores) rather than
    how good the prediction is (its direction is then only a display order).
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
    headline: bool = False
    needs_distances: bool = False
    quality: bool = True

    def value(self, meter_values: Mapping[str, Any]) -> float:
        """This metric from a meter's ``compute()`` output (NaN when it is not there)."""
        if self.compute is not None:
            return float(self.compute(meter_values))
        v = meter_values.get(self.name)
        return float(v) if v is not None else float("nan")


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}


@dataclass(frozen=True)
class Check:
    """A rule on one task's result metrics: ``<metric> <op> <other>``, ``other`` a metric of the same task or a number.

    Used as a task's ``prior`` (the model beats the prior predictor when it holds) and in its ``degenerate`` rules
    (the model is degenerate when one holds; ``message`` says how, formatted with ``{value}`` and ``{other}``).
    A comparison with a missing or NaN value does not hold."""

    metric: str
    op: str
    other: str | float
    message: str = ""

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"Check op {self.op!r}: expected one of {sorted(_OPS)}")

    def values(self, get: Callable[[str], Any]) -> tuple[float, float]:
        """(value, other) read through ``get(metric name) -> value or None``."""
        other = get(self.other) if isinstance(self.other, str) else self.other
        return _number(get(self.metric)), _number(other)

    def holds(self, get: Callable[[str], Any]) -> bool:
        value, other = self.values(get)
        return bool(_OPS[self.op](value, other))  # NaN compares False

    def keys(self) -> tuple[str, ...]:
        """The metric names the check reads."""
        return (self.metric,) + ((self.other,) if isinstance(self.other, str) else ())

    def describe(self, get: Callable[[str], Any]) -> str:
        value, other = self.values(get)
        return self.message.format(value=value, other=other)


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


@dataclass(frozen=True)
class LossOptions:
    """What a task's loss function may use besides logits and target (a loss ignores what does not apply to it)."""

    ignore_index: int = 255
    label_smoothing: float = 0.0
    weight: torch.Tensor | None = None  # per-class weights (cross-entropy)


@dataclass(frozen=True)
class MeterOptions:
    """Evaluation settings a task's meter may use."""

    ignore_index: int | None = 255
    distances: bool = True  # boundary distances and SSIM (the ``needs_distances`` metrics)
    compat_size: int | None = None  # resolution of the segmentation ``compat_`` values


@dataclass(frozen=True)
class HeadSpec:
    """What a head factory gets: the feature channels the head reads, its class count, the model options
    (:class:`~endoarss_lib.models.ModelConfig`), the feature-map side and the class-token width (None: no token)."""

    in_channels: int
    num_classes: int
    config: Any
    feature_size: int
    token_dim: int | None = None


@dataclass(frozen=True)
class EvalSubset:
    """The part of a dataset an evaluation is restricted to (a domain-shifted set's evaluated activities and
    segmentation classes, e.g. MTLEndovis-Gen): activity ids (None: all present) and segmentation class ids."""

    activities: frozenset | None
    seg_classes: tuple
    spec: Any = None

    @classmethod
    def of(cls, spec, activities=None) -> "EvalSubset":
        """The registry's subset of ``spec`` (``activities`` overrides its ``eval_activities``)."""
        acts = activities if activities is not None else spec.eval_activities
        classes = spec.eval_seg_classes if spec.eval_seg_classes is not None else range(spec.num_seg_classes)
        return cls(None if acts is None else frozenset(int(a) for a in acts), tuple(int(c) for c in classes), spec)


@dataclass(frozen=True)
class Task:
    """One task and the objects that define it (see the module docstring and ``docs/tasks.md``).

    ``classes_field``: the dataset-spec attribute (:class:`~endoarss_lib.data.DatasetSpec`) holding its number of
    classes (also the :class:`~endoarss_lib.models.ModelConfig` field of that name where one exists, else
    ``ModelConfig.task_classes[name]``); ``target``: the batch key of its ground truth; ``derive_target(batch,
    spec)``: computes that key from the batch when the data do not provide it (see :func:`add_targets`).

    ``loss_fn(logits, target, LossOptions) -> scalar``; ``meter_factory(num_classes, MeterOptions)`` -> an object
    with ``update(prediction, target)`` and ``compute() -> dict``; ``decode(logits) -> prediction`` (what the meter
    takes: class indices, probabilities); ``head_factory(HeadSpec) -> nn.Module`` and ``forward_head(head, fmap,
    token, out_size[, image]) -> logits`` (``image``: the model's input, for heads that read it; a function of four
    arguments is called without it); ``progress_fn(logits, target, ignore_index)`` -> mean probability of the truth
    (GM-Coord); ``prior``: the check a model must pass to beat the prior predictor, ``prior_output(train_dataset,
    num_classes)`` -> the prior predictor's logits for one image; ``degenerate``: checks that call a model degenerate
    (the first that holds is reported). Optional reporting hooks: ``image_record(logits_i, target_i, num_classes,
    ignore_index) -> dict`` (per-image records), ``display(logits_i) -> dict`` (``inference.predict``), ``per_class``
    (meter key of per-class values exposed by ``inference``), ``subset(values, images, EvalSubset) -> dict`` (metrics
    over a dataset's evaluated subset), ``example_target(num_classes, batch_size, image_size, device)`` (random
    targets for benchmarks); ``min_classes``: the fewest classes a head may have; ``fixed_classes``: a class count
    that does not depend on the dataset (a yes/no question: 2), instead of ``classes_field``; ``frame_output``: what
    one image's output is, for tools that run a model on new frames (``endoarss-predict``): ``label`` (one class of
    the image), ``labels`` (any number of classes: multi-label) or ``mask`` (one class per pixel);
    ``frame_column``: the stem of its columns in ``endoarss-predict``'s CSV (default: the task's name).
    """

    name: str
    description: str
    classes_field: str
    target: str
    metrics: tuple[Metric, ...] = field(default_factory=tuple)
    loss_fn: Callable | None = None
    meter_factory: Callable | None = None
    decode: Callable | None = None
    head_factory: Callable | None = None
    forward_head: Callable | None = None
    progress_fn: Callable | None = None
    prior: Check | None = None
    prior_output: Callable | None = None
    degenerate: tuple[Check, ...] = ()
    derive_target: Callable | None = None
    image_record: Callable | None = None
    display: Callable | None = None
    per_class: str | None = None
    subset: Callable | None = None
    example_target: Callable | None = None
    min_classes: int = 2
    fixed_classes: int | None = None
    frame_output: str = "label"
    frame_column: str = ""

    def frame_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """One image's logits as what ``endoarss-predict`` writes: per-class probabilities (``frame_output``
        ``label``: softmax, one class per image; ``labels``: sigmoid, each class on its own) or, for ``mask``, the
        per-pixel probabilities over the classes (softmax over the first dimension)."""
        if self.frame_output == "labels":
            return logits.float().sigmoid()
        return logits.float().softmax(0)

    # -- metrics -------------------------------------------------------------------------------------------------
    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.name!r} has no metric {name!r}; metrics: {[m.name for m in self.metrics]}")

    def result_values(self, meter_values: Mapping[str, Any]) -> dict[str, float]:
        """``{<task>_<metric>: value}`` for every declared metric."""
        return {f"{self.name}_{m.name}": m.value(meter_values) for m in self.metrics}

    # -- class count ---------------------------------------------------------------------------------------------
    def num_classes(self, spec) -> int | None:
        """The task's class count: ``fixed_classes``, else the dataset spec's ``classes_field`` (None when the spec
        declares none)."""
        if self.fixed_classes is not None:
            return int(self.fixed_classes)
        value = getattr(spec, self.classes_field, None)
        return None if value is None else int(value)

    # -- meter ---------------------------------------------------------------------------------------------------
    def make_meter(self, num_classes: int, ignore_index: int | None = 255, distances: bool = True,
                   compat_size: int | None = None):
        """The task's meter (``compat_size``: resolution of the segmentation ``compat_`` values, see
        :class:`~endoarss_lib.metrics.SegmentationMeter`)."""
        return self.meter_factory(num_classes, MeterOptions(ignore_index, distances, compat_size))

    def update_meter(self, meter, output: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Add a batch: the task's logits, decoded into predictions, against its target."""
        meter.update(self.decode(output.float()).cpu(), batch[self.target].cpu())

    # -- loss ----------------------------------------------------------------------------------------------------
    def loss(self, output: torch.Tensor, batch: Mapping[str, Any], ignore_index: int = 255,
             label_smoothing: float = 0.0, weight: torch.Tensor | None = None, loss_fn=None) -> torch.Tensor:
        """The task's raw loss as a float32 scalar (its ``loss_fn``, or ``loss_fn(logits, target)`` when given)."""
        target = batch[self.target]
        logits = output.float()
        if loss_fn is not None:
            return loss_fn(logits, target)
        return self.loss_fn(logits, target, LossOptions(ignore_index, label_smoothing, weight))

    @torch.no_grad()
    def progress(self, output: torch.Tensor, batch: Mapping[str, Any], ignore_index: int = 255) -> torch.Tensor:
        """Mean predicted probability of the truth (GM-Coord's progress score)."""
        return self.progress_fn(output.float(), batch[self.target], ignore_index)

    # -- head ----------------------------------------------------------------------------------------------------
    def make_head(self, spec: HeadSpec):
        """The task's head module."""
        return self.head_factory(spec)

    # -- prior and degeneracy ------------------------------------------------------------------------------------
    def beats_prior(self, get: Callable[[str], Any]) -> bool:
        """Whether the metrics read by ``get(metric name)`` beat the prior predictor (its ``prior`` check holds)."""
        return self.prior.holds(get)

    def degeneracy(self, get: Callable[[str], Any]) -> str | None:
        """How the model is degenerate on this task (the first ``degenerate`` check that holds), or None."""
        for check in self.degenerate:
            if check.holds(get):
                return check.describe(get)
        return None


# ---------------------------------------------------------------------------------------------------------------
# The building blocks of the registered tasks
# ---------------------------------------------------------------------------------------------------------------

def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1)


def _classification_loss(logits, target, o: LossOptions):
    return F.cross_entropy(logits, target, weight=o.weight, label_smoothing=o.label_smoothing)


def _segmentation_loss(logits, target, o: LossOptions):
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"seg logits {tuple(logits.shape[-2:])} and masks {tuple(target.shape[-2:])} differ in size")
    return F.cross_entropy(logits, target, weight=o.weight, ignore_index=o.ignore_index,
                           label_smoothing=o.label_smoothing)


def _classification_meter(num_classes: int, o: MeterOptions):
    return ClassificationMeter(num_classes)


def _segmentation_meter(num_classes: int, o: MeterOptions):
    return SegmentationMeter(num_classes, ignore_index=o.ignore_index, compute_distances=o.distances,
                             compute_ssim=o.distances, compat_size=o.compat_size)


def classification_head(h: HeadSpec):
    """Conv + pool + linear head (:class:`~endoarss_lib.models.ClassificationHead`), with the class token when the
    backbone has one (``cls_use_token``) and ``cls_dropout``: the head of every image-level task."""
    from .models.heads import ClassificationHead  # models import this registry: imported here to break the cycle

    return ClassificationHead(h.in_channels, h.num_classes, channels=h.config.head_channels, token_dim=h.token_dim,
                              dropout=h.config.cls_dropout)


def segmentation_head(h: HeadSpec):
    """DeepLab-V3 head (:class:`~endoarss_lib.models.SegmentationHead`): the head of every dense task."""
    from .models.heads import SegmentationHead  # models import this registry: imported here to break the cycle

    return SegmentationHead(h.in_channels, h.num_classes, channels=h.config.head_channels, rates=h.config.seg_rates,
                            feature_size=h.feature_size, dropout=h.config.seg_dropout,
                            detail_channels=getattr(h.config, "seg_detail_channels", 0) or 0)


def forward_image_head(head, fmap, token, size, image=None):
    """An image-level head reads the feature map (and the class token when it was built with one)."""
    return head(fmap, token if getattr(head, "token_dim", None) else None)


def forward_dense_head(head, fmap, token, size, image=None):
    """A dense head reads the feature map and upsamples to the input size (a head with a detail branch also reads
    the input image)."""
    if getattr(head, "detail_channels", 0):
        return head(fmap, out_size=(int(size[0]), int(size[1])), image=image)
    return head(fmap, out_size=(int(size[0]), int(size[1])))


def _classification_progress(logits, target, ignore_index):
    return logits.softmax(1).gather(1, target.view(-1, 1)).mean()


def _segmentation_progress(logits, target, ignore_index):
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    prob = logits.log_softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1).exp()
    n = valid.sum()
    return prob[valid].sum() / n if n > 0 else torch.tensor(float("nan"), device=prob.device)


def _one_hot(index: np.ndarray, num_classes: int) -> torch.Tensor:
    """(…) class indices -> (num_classes, …) float one-hot logits (argmax gives the index back)."""
    return F.one_hot(torch.as_tensor(index, dtype=torch.long), num_classes).movedim(-1, 0).float()


def _classification_prior(train, num_classes: int) -> torch.Tensor:
    """Always the most frequent training activity."""
    return _one_hot(np.bincount(train.labels, minlength=num_classes).argmax(), num_classes)


def _segmentation_prior(train, num_classes: int) -> torch.Tensor:
    """For every pixel the class most frequent at that position in the training masks."""
    size = train.image_size
    counts = np.zeros((num_classes, size, size), np.int64)
    rows, cols = np.indices((size, size))
    for index in range(len(train)):
        mask = train[index]["mask"].numpy()
        valid = mask != train.ignore_index
        np.add.at(counts, (mask[valid], rows[valid], cols[valid]), 1)
    return _one_hot(counts.argmax(0), num_classes)


def _classification_record(logits, target, num_classes, ignore_index) -> dict:
    pred = int(logits.float().argmax())
    return {"pred_label": pred, "correct": pred == int(target)}


def _segmentation_record(logits, target, num_classes, ignore_index) -> dict:
    pred = logits.float().argmax(0).cpu()
    truth = target.cpu()
    valid = truth != ignore_index
    p_fg, t_fg = (pred > 0) & valid, (truth > 0) & valid  # ignored pixels are neither
    union, inter = int((p_fg | t_fg).sum()), int((p_fg & t_fg).sum())
    rec = {"fg_inter": inter, "fg_union": union, "fg_iou": inter / union if union else float("nan")}
    ious = []
    for c in range(num_classes or 0):
        pc, tc = (pred == c) & valid, (truth == c) & valid
        u = int((pc | tc).sum())
        ious.append(int((pc & tc).sum()) / u if u else float("nan"))
    rec["iou_per_class"] = ious
    return rec


def _classification_display(logits) -> dict:
    probs = logits.float().softmax(0).cpu().numpy()
    return {"pred_label": int(probs.argmax()), "cls_probs": probs}


def _segmentation_display(logits) -> dict:
    return {"pred_mask": logits.float().argmax(0).cpu().numpy()}


def _classification_subset(values, images, subset: EvalSubset) -> dict:
    """Accuracy over the images of the subset's activities (needs per-image records)."""
    if not images or "correct" not in images[0]:
        return {}
    kept = [r["correct"] for r in images if subset.activities is None or r["label"] in subset.activities]
    return {"accuracy_eval": float(np.mean(kept)) if kept else float("nan")}


def _segmentation_subset(values, images, subset: EvalSubset) -> dict:
    sub = subset_metrics(values["confusion"], subset.seg_classes)
    return {"miou_eval": sub["miou"], "dice_eval": sub["dice"]}


def _random_labels(num_classes, batch_size, image_size, device):
    return torch.randint(0, num_classes, (batch_size,), device=device)


def _random_masks(num_classes, batch_size, image_size, device):
    return torch.randint(0, num_classes, (batch_size, image_size, image_size), device=device)


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


# The two kinds of task the paper has, as keyword sets: a new task of either kind reuses them (docs/tasks.md). The
# activity's prior (the most frequent training activity) reads the dataset's activity labels: a new image-level task
# gives its own ``prior_output`` or none.
IMAGE_CLASSIFICATION = dict(loss_fn=_classification_loss, meter_factory=_classification_meter, decode=_argmax,
                            head_factory=classification_head, forward_head=forward_image_head,
                            progress_fn=_classification_progress, prior_output=_classification_prior,
                            image_record=_classification_record, display=_classification_display,
                            example_target=_random_labels)
DENSE_SEGMENTATION = dict(loss_fn=_segmentation_loss, meter_factory=_segmentation_meter, decode=_argmax,
                          head_factory=segmentation_head, forward_head=forward_dense_head,
                          progress_fn=_segmentation_progress, prior_output=_segmentation_prior,
                          image_record=_segmentation_record, display=_segmentation_display,
                          example_target=_random_masks, frame_output="mask")

# -- instrument presence: multi-label, derived from the masks ------------------------------------------------------

def presence_from_masks(masks: torch.Tensor, instrument_classes) -> torch.Tensor:
    """(B, H, W) train-id masks -> (B, C) float 0/1: is instrument class ``instrument_classes[c]`` in the image?"""
    flat = masks.flatten(1)
    return torch.stack([(flat == int(c)).any(1) for c in instrument_classes], 1).float()


def _presence_target(batch, spec) -> torch.Tensor:
    if spec is None:
        raise ValueError("task 'presence' derives its targets from the masks and the dataset's instrument classes: "
                         "pass spec= (the dataset's .spec)")
    if spec.instrument_classes is None:
        raise ValueError(f"task 'presence': dataset {spec.name!r} does not declare its instrument classes")
    return presence_from_masks(batch["mask"], spec.instrument_classes)


def _presence_loss(logits, target, o: LossOptions):
    """Binary cross-entropy with logits per instrument class (label smoothing and class weights do not apply)."""
    return F.binary_cross_entropy_with_logits(logits, target.float())


def _presence_meter(num_classes: int, o: MeterOptions):
    return MultiLabelMeter(num_classes)


def _presence_progress(logits, target, ignore_index):
    p = logits.sigmoid()
    return (target * p + (1 - target) * (1 - p)).mean()


def _presence_prior(train, num_classes: int) -> torch.Tensor:
    """Every instrument scored by its share of the training images (the logit of that share)."""
    seen = torch.zeros(num_classes)
    for index in range(len(train)):
        seen += _presence_target({"mask": train[index]["mask"][None]}, train.spec)[0]
    share = (seen / max(len(train), 1)).clamp(1e-6, 1 - 1e-6)
    return torch.log(share) - torch.log1p(-share)


def _presence_record(logits, target, num_classes, ignore_index) -> dict:
    return {"presence_pred": torch.nonzero(logits.float().sigmoid() >= 0.5).flatten().tolist(),
            "presence_true": torch.nonzero(target > 0.5).flatten().tolist()}


def _presence_display(logits) -> dict:
    return {"presence_probs": logits.float().sigmoid().cpu().numpy()}


def _presence_subset(values, images, subset: EvalSubset) -> dict:
    """mAP over the instruments among the subset's segmentation classes."""
    if subset.spec is None or subset.spec.instrument_classes is None:
        return {}
    kept = [k for k, c in enumerate(subset.spec.instrument_classes) if c in subset.seg_classes]
    ap = np.asarray(values["ap_per_class"], dtype=np.float64)[kept]
    return {"map_eval": float(np.mean(ap[np.isfinite(ap)])) if np.isfinite(ap).any() else float("nan")}


def _random_presence(num_classes, batch_size, image_size, device):
    return torch.randint(0, 2, (batch_size, num_classes), device=device).float()


TASKS: dict[str, Task] = {
    "cls": Task(
        "cls", "surgical activity recognition: one activity label per image", "num_activities", "label",
        metrics=(
            Metric("accuracy", True, "AC", delta_m=True, headline=True),
            Metric("macro_f1", True, "F1", delta_m=True),
            Metric("weighted_f1", True, "wF1", main=False),
            Metric("compat_ac", True, "compat AC", paper="AC", beside="accuracy",
                   note="top-1 accuracy (the compat 'AC' is macro precision, tp / (column sum + 1e-8))"),
            Metric("compat_f1", True, "compat F", paper="F_score", beside="macro_f1", note="exact macro F1"),
            Metric("predicted_classes", True, "pred. classes", main=False, unit="count",
                   compute=_cls_predicted_classes, quality=False),
            Metric("majority_accuracy", True, "majority AC", main=False, compute=_cls_majority_accuracy,
                   quality=False),
        ),
        prior=Check("accuracy", ">", "majority_accuracy"),
        degenerate=(Check("predicted_classes", "==", 1, "predicts one activity for every image"),
                    Check("accuracy", "<=", "majority_accuracy", "activity accuracy {value:.3f} is not above the "
                                                                  "majority class's {other:.3f}")),
        subset=_classification_subset, frame_column="activity", **IMAGE_CLASSIFICATION),
    "seg": Task(
        "seg", "semantic segmentation: one class per pixel (background 0)", "num_seg_classes", "mask",
        metrics=(
            Metric("miou", True, "mIoU", delta_m=True, headline=True),
            Metric("miou_fg", True, "mIoU fg"),
            Metric("dice", True, "Dice", delta_m=True),
            Metric("dice_fg", True, "Dice fg", main=False),
            Metric("pixel_acc", True, "PixAcc", main=False),
            Metric("hd", False, "HD", unit="pixels", main=False, needs_distances=True),
            Metric("hd95", False, "HD95", unit="pixels", delta_m=True, needs_distances=True),
            Metric("hd_one_sided_rate", False, "HD one-sided", unit="rate", main=False, needs_distances=True),
            Metric("ssim", True, "SSIM", needs_distances=True),
            Metric("compat_miou", True, "compat mIoU", paper="mIoU", beside="miou",
                   note="mIoU with background, absent classes left out (compat: background included, absent = 0)"),
            Metric("compat_dice", True, "compat DS", paper="DS", beside="dice",
                   note="mean Dice with background, absent left out"),
            Metric("compat_hd", False, "compat HD", paper="HD", beside="hd", paper_scale=1.0, unit="pixels",
                   note="boundary Hausdorff distance in pixels (compat: row-wise HD of the label maps, other units)",
                   needs_distances=True),
            Metric("compat_ssim", True, "compat SSIM", paper="SSIM", beside="ssim",
                   note="SSIM of one-hot masks per class (compat: SSIM of the class-index maps)", needs_distances=True),
            Metric("pred_fg_fraction", True, "pred. fg", main=False, compute=_seg_pred_fg_fraction, quality=False),
            Metric("true_fg_fraction", True, "true fg", main=False, compute=_seg_true_fg_fraction, quality=False),
        ),
        prior=Check("miou_fg", ">", 0.0),
        degenerate=(Check("pred_fg_fraction", "==", 0, "segments everything as background"),),
        per_class="iou_per_class", subset=_segmentation_subset, **DENSE_SEGMENTATION),
    "presence": Task(
        "presence", "instrument presence: which instrument classes appear in the image (multi-label, from the masks)",
        "num_instruments", "presence",
        metrics=(
            Metric("map", True, "mAP", delta_m=True, headline=True),
            Metric("macro_f1", True, "F1", delta_m=True),
            Metric("chance_map", True, "chance mAP", main=False, quality=False),
            Metric("predicted_sets", True, "pred. sets", main=False, unit="count", quality=False),
        ),
        loss_fn=_presence_loss, meter_factory=_presence_meter, decode=torch.sigmoid, head_factory=classification_head,
        forward_head=forward_image_head, progress_fn=_presence_progress,
        prior=Check("map", ">", "chance_map"), prior_output=_presence_prior,
        degenerate=(Check("predicted_sets", "==", 1, "predicts the same instruments for every image"),
                    Check("map", "<=", "chance_map", "instrument mAP {value:.3f} is not above the {other:.3f} of a "
                                                      "constant score")),
        derive_target=_presence_target, image_record=_presence_record, display=_presence_display,
        per_class="ap_per_class", subset=_presence_subset, example_target=_random_presence, min_classes=1,
        frame_output="labels", frame_column="present"),
}
TASK_NAMES = tuple(TASKS)  # the tasks registered when the package was imported (TASKS is the live registry)


def get_task(name: str) -> Task:
    """The registered task ``name``; ValueError listing the tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {list(TASKS)}")
    return TASKS[name]


_REQUIRED = ("loss_fn", "meter_factory", "decode", "head_factory", "forward_head", "progress_fn", "prior")


FRAME_OUTPUTS = ("label", "labels", "mask")  # Task.frame_output: one class per image, several, one per pixel


def register_task(task: Task, replace: bool = False) -> Task:
    """Add a task to the registry (``replace=True`` to redefine one): models, training, evaluation, result rows and
    tables then know it. Its name must not contain ``_`` (result keys are ``<task>_<metric>``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    if not task.name or "_" in task.name or not task.name.isidentifier():
        raise ValueError(f"task name {task.name!r}: expected an identifier without '_' (result keys are "
                         "<task>_<metric>)")
    if task.name in TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered (pass replace=True to redefine it)")
    missing = [f for f in _REQUIRED if getattr(task, f) is None]
    if missing:
        raise ValueError(f"task {task.name!r} lacks {missing}: every task carries its loss, meter, decoding, head "
                         "and prior")
    if task.frame_output not in FRAME_OUTPUTS:
        raise ValueError(f"task {task.name!r}: frame_output={task.frame_output!r}; expected one of {FRAME_OUTPUTS}")
    names = [m.name for m in task.metrics]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"task {task.name!r}: metrics must be non-empty with distinct names, got {names}")
    for check in (task.prior, *task.degenerate):
        unknown = [k for k in check.keys() if k not in names]
        if unknown:
            raise ValueError(f"task {task.name!r}: check {check} reads undeclared metrics {unknown}")
    TASKS[task.name] = task
    return task


def unregister_task(name: str) -> Task:
    """Remove a task from the registry (tests register toy tasks and remove them again); returns it."""
    if name in DEFAULT_TASKS:
        raise ValueError(f"task {name!r} is one of the default tasks {DEFAULT_TASKS} and cannot be removed")
    return TASKS.pop(get_task(name).name)


def register_metric(task: str, metric: Metric) -> None:
    """Add (or replace) a metric of ``task``: the one edit that makes it reach result rows, tables and Delta_m."""
    t = get_task(task)
    kept = tuple(m for m in t.metrics if m.name != metric.name)
    TASKS[task] = dataclasses.replace(t, metrics=kept + (metric,))


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """``tasks`` as a tuple of distinct registered names; ValueError naming the registry otherwise."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks={tasks!r} must be distinct names from {tuple(TASKS)}")
    return tasks


def add_targets(batch: Mapping[str, Any], tasks: Sequence[str], spec=None) -> Mapping[str, Any]:
    """The batch with every task's target: a task whose ``target`` key the batch lacks gets it from its
    ``derive_target(batch, spec)`` (e.g. instrument presence from the masks and ``spec``'s instrument classes: the
    dataset's ``.spec``). Returns ``batch`` itself when nothing is missing."""
    missing = [get_task(t) for t in tasks if get_task(t).target not in batch]
    if not missing:
        return batch
    out = dict(batch)
    for task in missing:
        if task.derive_target is None:
            raise KeyError(f"the batch has no {task.target!r} (the target of task {task.name!r}); keys: "
                           f"{sorted(batch)}")
        out[task.target] = task.derive_target(out, spec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Result keys
# ---------------------------------------------------------------------------------------------------------------

_SPLITS = ("test_", "val_", "train_")


class ResultKeyError(KeyError, ValueError):
    """A key that is not ``[<split>_]<task>_<metric>`` (a KeyError, and a ValueError for callers that expect one)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def split_key(key: str, registered: bool = True) -> tuple[str, str, str]:
    """``"test_seg_hd95"`` -> ``("test", "seg", "hd95")``; the split is ``""`` when absent (``"seg_hd95"``).

    The one parser of result keys. ``registered=False`` accepts any ``<task>_`` prefix (Delta_m over tasks named
    by the caller); otherwise the task must be registered (ResultKeyError otherwise)."""
    split = ""
    for prefix in _SPLITS:
        if key.startswith(prefix):
            split, key = prefix[:-1], key[len(prefix):]
            break
    task, sep, name = key.partition("_")
    if not sep or not task or not name:
        raise ResultKeyError(f"metric {key!r} has no <task>_ prefix (e.g. cls_accuracy, seg_miou); pass tasks=")
    if registered and task not in TASKS:
        raise ResultKeyError(f"{key!r} is not a result key of a registered task ({list(TASKS)})")
    return split, task, name


def metric_info(key: str) -> tuple[Task, Metric]:
    """The task and metric of a result key (``cls_accuracy``, ``test_seg_hd95``, ...)."""
    _, task, name = split_key(key)
    try:
        return TASKS[task], TASKS[task].metric(name)
    except KeyError:
        raise ResultKeyError(f"{key!r}: task {task!r} declares no metric {name!r}; metrics: "
                             f"{[m.name for m in TASKS[task].metrics]}") from None


def higher_is_better(key: str) -> bool:
    """Direction of a result key (``test_seg_hd`` -> False)."""
    return metric_info(key)[1].higher_is_better


def result_keys(tasks=DEFAULT_TASKS, split: str = "", where: Callable[[Metric], bool] | None = None) -> list[str]:
    """Result keys of ``tasks`` (optionally filtered), prefixed with ``<split>_`` when a split is given."""
    prefix = f"{split}_" if split else ""
    return [f"{prefix}{t}_{m.name}" for t in tasks for m in get_task(t).metrics if where is None or where(m)]


def main_keys(tasks=DEFAULT_TASKS, split: str = "test") -> list[str]:
    """The keys main tables show (correct first, then ``compat_``)."""
    return result_keys(tasks, split, lambda m: m.main)


def headline_keys(tasks=DEFAULT_TASKS, split: str = "") -> list[str]:
    """Each task's headline metric (model selection's ``score`` averages them)."""
    return result_keys(tasks, split, lambda m: m.headline)


def delta_m_keys(tasks=DEFAULT_TASKS, split: str = "test") -> dict[str, bool]:
    """``{key: higher_is_better}`` of the metrics that enter Delta_m."""
    return {k: higher_is_better(k) for k in result_keys(tasks, split, lambda m: m.delta_m)}


def paper_columns(tasks=DEFAULT_TASKS) -> dict[str, tuple[str, Metric]]:
    """``{paper column: (task, compat metric)}`` for the metrics that sit beside the paper's tables."""
    return {m.paper: (t, m) for t in tasks for m in get_task(t).metrics if m.paper}

