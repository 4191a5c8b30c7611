"""Task losses: cross-entropy for the activity, per-pixel cross-entropy for segmentation, and MEJO's CGL.

* :func:`task_losses` -- the raw (unweighted) loss of every task; the activity loss is cross-entropy unless a
  ``cls_loss`` callable (e.g. a :class:`CGLLoss`) is given.
* :class:`CGLLoss` -- **Coordinated Gradient Learning** (MEJO, Zhang et al. 2025, arXiv:2509.12893), an intra-task,
  long-tail classification loss: head / medium / tail classes from the *training split's* class counts
  (:func:`class_groups`), one-vs-rest sigmoid BCE with a seeded Bernoulli drop of some positive / negative entries,
  positive / negative balanced averaging (:func:`cgl_loss` is the pure function).
* :func:`progress_scores` -- per-task mean true-class probabilities of a batch (GM-Coord's progress scores).

CGL's public form. The MEJO paper describes CGL in words ("dissects and rebalances the positive-negative gradients
originating from head and tail classes"); its exact formula is not in the text this project has. The form below is
the closest public definition (the authors' later release of the same loss, as summarised in the project's
``docs/seed_components.md``), adapted to single-label activity recognition with one-hot targets ``y`` over C classes:

* ``l_ic = BCEWithLogits(z_ic, y_ic)`` for every sample i and class c;
* a Bernoulli drop mask ``m_ic ~ Bernoulli(p)`` drawn fresh at every call from a seeded ``torch.Generator``;
* ``E_i = 1`` if sample i has no tail-class positive (its true class is not a tail class);
* negative weight ``w-_ic = 1 - E_i * tail_c * m_ic * (1 - y_ic)``: some of the negative gradient that tail
  classes receive from samples without any tail class is dropped (tail classes are pushed down less often);
* positive weight ``w+_ic = 1 - (1 - tail_c) * m_ic * y_ic``: some of the positive gradient of non-tail (head and
  medium) classes is dropped (frequent classes are pulled up less often);
* ``w = w- * w+`` and ``loss = 0.5 * (sum_{y=1} w l / n_pos + sum_{y=0} w l / n_neg)`` where ``n_pos`` / ``n_neg``
  count **all** positive / negative entries, dropped ones included.

With ``p = 0`` this is the balanced BCE ``0.5 * (mean_{y=1} l + mean_{y=0} l)``; a dropped entry has weight exactly
0, so its gradient is exactly zero. Medium classes are treated like head classes by the weights (only "tail" enters
the formula); the grouping reports all three for tables.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..tasks import get_task

__all__ = ["task_losses", "CGLLoss", "cgl_loss", "cgl_weights", "class_groups", "progress_scores", "CLS_LOSSES",
           "make_cls_loss", "CLS_LOSS_TASK"]

GROUPS = ("head", "medium", "tail")
CLS_LOSSES = ("ce", "cgl")


CLS_LOSS_TASK = "cls"  # the task whose loss TrainConfig.cls_loss (cross-entropy or CGL) chooses: the activity


def task_losses(outputs: dict[str, torch.Tensor], batch: dict, tasks, ignore_index: int = 255,
                label_smoothing: float = 0.0, class_weights: dict | None = None,
                cls_loss=None, loss_fns: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Raw (unweighted) loss of every task (:meth:`endoarss_lib.tasks.Task.loss`), as float32 scalars.

    ``loss_fns``: ``{task: callable (logits, target) -> scalar}`` used instead of a task's own loss (LibMTL's
    per-task ``loss_fn``); ``cls_loss`` is the activity's (:data:`CLS_LOSS_TASK`), e.g. :class:`CGLLoss`.
    ``label_smoothing`` and ``class_weights[task]`` do not apply to a replaced loss.
    """
    class_weights = class_weights or {}
    replaced = dict(loss_fns or {})
    if cls_loss is not None:
        replaced[CLS_LOSS_TASK] = cls_loss
    return {t: get_task(t).loss(outputs[t], batch, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                weight=class_weights.get(t), loss_fn=replaced.get(t))
            for t in tasks}


@torch.no_grad()
def progress_scores(outputs: dict[str, torch.Tensor], batch: dict, tasks, ignore_index: int = 255) -> torch.Tensor:
    """Per-task progress of a batch (detached float32, one per task in ``tasks`` order): the mean softmax probability
    of the true class (:meth:`endoarss_lib.tasks.Task.progress`), GM-Coord's per-modality scores with tasks in place
    of modalities."""
    return torch.stack([get_task(t).progress(outputs[t], batch, ignore_index) for t in tasks]).float()


# ---------------------------------------------------------------------------------------------------------------
# CGL: head / medium / tail grouping
# ---------------------------------------------------------------------------------------------------------------

def class_groups(class_counts: Sequence[int] | np.ndarray, grouping: Any = "relative", head: float = 2.0,
                 tail: float = 0.5) -> np.ndarray:
    """``"head"`` / ``"medium"`` / ``"tail"`` for each class, from its count in the **training** split.

    ``grouping``:

    * ``"relative"`` (default): with C classes and frequencies ``f_c = n_c / sum n``, head if ``f_c > head / C``,
      tail if ``f_c < tail / C`` (defaults 2/C and 0.5/C: with 3-12 activities percentiles of a dozen numbers are
      too coarse, so the rule is relative to the uniform share); medium otherwise;
    * ``"percentile"``: head if ``n_c`` is strictly above the ``head``-quantile of the counts, tail if strictly below
      the ``tail``-quantile (then ``head`` / ``tail`` are quantiles in [0, 1], e.g. ``head=0.75, tail=0.25``);
      balanced counts give no head and no tail;
    * a sequence of C group names (an explicit grouping).
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"class_counts must be a 1-D sequence of at least two counts, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.number) or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"class_counts must be finite non-negative numbers, got {counts.tolist()}")
    if counts.sum() <= 0:
        raise ValueError("class_counts sum to zero: no training samples to group classes by")
    c = counts.size
    if isinstance(grouping, str):
        if grouping == "relative":
            if not 0 <= tail <= 1 <= head:
                raise ValueError(f"relative grouping needs 0 <= tail <= 1 <= head (multiples of 1/C), got "
                                 f"head={head}, tail={tail}")
            freq = counts / counts.sum()
            is_head, is_tail = freq > head / c, freq < tail / c
        elif grouping == "percentile":
            if not 0 <= tail <= head <= 1:
                raise ValueError(f"percentile grouping needs quantiles 0 <= tail <= head <= 1, got head={head}, "
                                 f"tail={tail}")
            is_head = counts > np.quantile(counts, head)
            is_tail = counts < np.quantile(counts, tail)
        else:
            raise ValueError(f"grouping={grouping!r}: expected 'relative', 'percentile' or a sequence of C group names")
        return np.where(is_head, "head", np.where(is_tail, "tail", "medium")).astype(object)
    groups = np.asarray(list(grouping), dtype=object)
    if groups.shape != (c,) or any(g not in GROUPS for g in groups):
        raise ValueError(f"an explicit grouping must name one of {GROUPS} for each of the {c} classes, got "
                         f"{list(grouping)}")
    return groups


# ---------------------------------------------------------------------------------------------------------------
# CGL: the loss
# ---------------------------------------------------------------------------------------------------------------

def _check_logits_target(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, C={num_classes}), got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must be (B={logits.shape[0]},) class indices, got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target holds class indices outside 0..{num_classes - 1}")


def cgl_weights(target: torch.Tensor, tail: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Per-entry CGL weights ``w = w- * w+`` (B, C) from class indices (B,), a tail indicator (C,) and the Bernoulli
    drop mask (B, C) (see the module docstring)."""
    num_classes = tail.numel()
    y = F.one_hot(target.long(), num_classes).to(drop.dtype)
    tail = tail.to(device=drop.device, dtype=drop.dtype).view(1, -1)
    m = drop.to(y.dtype)
    e = 1.0 - (y * tail).sum(1, keepdim=True)  # E_i: sample i has no tail-class positive
    w_neg = 1.0 - e * tail * m * (1.0 - y)
    w_pos = 1.0 - (1.0 - tail) * m * y
    return w_neg * w_pos


def cgl_loss(logits: torch.Tensor, target: torch.Tensor, tail: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """CGL as a pure function of logits (B, C), class indices (B,), tail indicator (C,) and drop mask (B, C).

    ``0.5 * (sum_{y=1} w l / n_pos + sum_{y=0} w l / n_neg)`` with ``l`` the elementwise BCE-with-logits; a side
    with no entries contributes 0.
    """
    num_classes = tail.numel()
    _check_logits_target(logits, target, num_classes)
    if drop.shape != logits.shape:
        raise ValueError(f"drop mask must have the logits' shape {tuple(logits.shape)}, got {tuple(drop.shape)}")
    y = F.one_hot(target.long(), num_classes).to(logits.dtype)
    w = cgl_weights(target, tail, drop.to(logits.dtype)).detach()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    weighted = w * bce
    n_pos, n_neg = y.sum(), (1.0 - y).sum()
    pos = (weighted * y).sum() / n_pos if n_pos > 0 else weighted.sum() * 0.0
    neg = (weighted * (1.0 - y)).sum() / n_neg if n_neg > 0 else weighted.sum() * 0.0
    return 0.5 * (pos + neg)


class CGLLoss:
    """MEJO's Coordinated Gradient Learning as a classification loss: ``loss_fn(logits (B, C), target (B,))``.

    Args:
        class_counts: samples per class **in the training split only** (e.g. ``train_set.class_counts()``);
            never counts from validation or test data.
        p: Bernoulli drop probability (MEJO: 0.1). ``p = 0`` gives the balanced BCE.
        grouping: ``"relative"`` (default), ``"percentile"`` or an explicit list of group names (see
            :func:`class_groups`); ``head`` / ``tail`` are its thresholds.
        generator: a ``torch.Generator`` (CPU) that draws the drop masks; ``None`` -> a new one seeded with ``seed``.
            The masks are drawn on the CPU and moved to the logits' device, so they do not depend on the device.

    ``state_dict()`` / ``load_state_dict()`` hold the generator state (a resumed run draws the same masks).
    ``last_drop`` keeps the mask of the latest call (inspection, tests).
    """

    name = "cgl"

    def __init__(self, class_counts, p: float = 0.1, grouping: Any = "relative", generator: torch.Generator | None
                 = None, head: float = 2.0, tail: float = 0.5, seed: int = 0):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator)}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator must be a CPU generator (masks are drawn on the CPU)")
        self.class_counts = np.asarray(class_counts).astype(np.int64 if np.issubdtype(
            np.asarray(class_counts).dtype, np.integer) else np.float64)
        self.groups = class_groups(self.class_counts, grouping, head=head, tail=tail)
        self.p = float(p)
        self.grouping = grouping if isinstance(grouping, str) else list(self.groups)
        self.num_classes = int(self.class_counts.size)
        self.tail = torch.tensor([g == "tail" for g in self.groups], dtype=torch.float32)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        self.last_drop: torch.Tensor | None = None

    def __repr__(self) -> str:
        counts = {g: int((self.groups == g).sum()) for g in GROUPS}
        return f"CGLLoss(p={self.p}, grouping={self.grouping!r}, classes={counts})"

    def group_of(self, c: int) -> str:
        return str(self.groups[c])

    def draw_mask(self, shape) -> torch.Tensor:
        """A fresh Bernoulli(p) drop mask (float 0/1) of ``shape`` from the generator (always advances it)."""
        return (torch.rand(tuple(shape), generator=self.generator) < self.p).float()

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits_target(logits, target, self.num_classes)
        drop = self.draw_mask(logits.shape).to(logits.device)
        self.last_drop = drop
        return cgl_loss(logits, target, self.tail.to(logits.device), drop)

    def state_dict(self) -> dict:
        return {"name": self.name, "p": self.p, "generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of {state.get('name')!r} cannot be loaded into CGLLoss")
        self.generator.set_state(state["generator"].clone())


def make_cls_loss(name: str, class_counts=None, seed: int = 0, **hparams):
    """The activity loss of a config: ``None`` for ``"ce"`` (cross-entropy in :func:`task_losses`), a
    :class:`CGLLoss` for ``"cgl"`` (its generator seeded with ``seed``; ``class_counts`` from the training split)."""
    if name == "ce":
        if hparams:
            raise TypeError(f"cls_loss='ce' takes no cls_loss_hparams, got {sorted(hparams)}")
        return None
    if name == "cgl":
        if class_counts is None:
            raise ValueError("cls_loss='cgl' needs the training split's class counts")
        if "generator" in hparams or "seed" in hparams:
            raise TypeError("the CGL generator is seeded from the run seed; do not pass generator/seed")
        return CGLLoss(class_counts, generator=torch.Generator().manual_seed(int(seed)), **hparams)
    raise ValueError(f"unknown cls_loss {name!r}; valid: {', '.join(CLS_LOSSES)}")
