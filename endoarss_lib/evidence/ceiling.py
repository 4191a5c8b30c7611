"""The patch-grid ceiling: how well a segmentation could score if each token predicted one class for its patch.

A ViT with patch ``p`` sees an image as a grid of p x p patches. A head that predicts one class per token and
upsamples it (the paper's DeepLab-V3 head on the token map, up to its bilinear smoothing) is bounded by the
*oracle* that gives each patch the majority true class of its pixels: :func:`patch_ceiling` computes that oracle's
metrics on the true masks, so a result table can show beside each class how much of it a token grid can draw at
all. A class smaller than half a patch is never a patch's majority and has ceiling 0.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..metrics import _segmentation_from_confusion

__all__ = ["patch_majority", "patch_ceiling"]


def patch_majority(mask: np.ndarray, patch: int, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """The mask as the patch oracle predicts it: every ``patch`` x ``patch`` cell filled with its majority class
    (ignored pixels do not vote; a tie goes to the lower class id; a cell of ignored pixels only predicts 0)."""
    mask = np.asarray(mask)
    h, w = mask.shape
    if h % patch or w % patch:
        raise ValueError(f"mask {h} x {w} is not a whole number of {patch} px patches")
    cells = mask.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3).reshape(h // patch, w // patch,
                                                                                              -1)
    votes = np.zeros((h // patch, w // patch, num_classes), np.int64)
    for c in range(num_classes):
        votes[..., c] = (cells == c).sum(-1)
    winner = votes.argmax(-1)
    return np.repeat(np.repeat(winner, patch, 0), patch, 1)


def patch_ceiling(masks: Iterable[np.ndarray], patch: int, num_classes: int, ignore_index: int | None = 255,
                  class_names: Sequence[str] | None = None) -> dict:
    """Metrics of the patch-majority oracle over ``masks`` (true label maps at the model's input size):
    ``miou``, ``miou_fg``, ``iou_per_class`` (and ``iou_<name>`` with ``class_names``), ``confusion``."""
    total = np.zeros((num_classes, num_classes), np.int64)
    for mask in masks:
        mask = np.asarray(mask).astype(np.int64)
        pred = patch_majority(mask, patch, num_classes, ignore_index)
        valid = (mask != ignore_index) if ignore_index is not None else np.ones_like(mask, bool)
        total += np.bincount(mask[valid] * num_classes + pred[valid],
                             minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    out = _segmentation_from_confusion(total)
    result = {"miou": out["miou"], "miou_fg": out["miou_fg"], "iou_per_class": out["iou_per_class"],
              "confusion": total, "patch": patch}
    for c, name in enumerate(class_names or []):
        result[f"iou_{name}"] = float(out["iou_per_class"][c])
    return result
