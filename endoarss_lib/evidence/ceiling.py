"""The patch-grid ceiling: how well a segmentation could score if each token predicted one class for its patch.

A ViT with patch ``p`` sees an image as a grid of p x p patches. A head that predicts one class per token and
upsamples it (the paper's DeepLab-V3 head on the token map, up to its bilinear smoothing) is bounded by the
*oracle* that gives each patch the majority true class of its pixels: :func:`patch_ceiling` computes that oracle's
metrics on the true masks, so a result table can show beside each class how much of it a token grid can draw at
all. A class smaller than half a patch is never a patch's majority and has ceiling 0.

The activity ceiling (:func:`activity_ceiling`) bounds image-level recognition the same way: an oracle that sees
which classes an image's true mask contains, with each look-alike pair merged into one class (it sees a shaft, not
which of the two shafts), and answers the activity most frequent for that set of classes in the training split. On
the synthetic MTLESD, injection and dissection differ only by the look-alike pairs and by bleeding (drawn in 60 % of
dissections), so no model can reach 1.0 there; with the pairs told apart (``merge=()``) the oracle can.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..metrics import _segmentation_from_confusion

__all__ = ["patch_majority", "patch_ceiling", "activity_ceiling"]


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


def _signature(mask: np.ndarray, merge: dict[int, int], ignore_index: int | None) -> tuple[int, ...]:
    present = np.unique(np.asarray(mask))
    if ignore_index is not None:
        present = present[present != ignore_index]
    return tuple(sorted({merge.get(int(c), int(c)) for c in present}))


def activity_ceiling(train: Iterable[tuple[np.ndarray, int]], test: Iterable[tuple[np.ndarray, int]],
                     merge: Sequence[tuple[int, int]] = (), ignore_index: int | None = 255) -> dict:
    """Accuracy on ``test`` of the oracle that answers, for the set of classes present in an image's true mask (each
    pair of ``merge`` counted as one class), the activity most frequent for that set in ``train`` (ties: the lower
    activity id; a set never seen in ``train``: the most frequent activity overall). ``train`` / ``test``: ``(mask,
    activity)`` pairs. Returns ``accuracy``, ``n_test``, and ``signatures``: one row per class set seen in test with
    its activity counts there and the oracle's answer."""
    merge_map = {int(b): int(a) for a, b in merge}
    counts: dict[tuple[int, ...], dict[int, int]] = {}
    overall: dict[int, int] = {}
    for mask, label in train:
        sig = _signature(mask, merge_map, ignore_index)
        counts.setdefault(sig, {})
        counts[sig][int(label)] = counts[sig].get(int(label), 0) + 1
        overall[int(label)] = overall.get(int(label), 0) + 1
    if not overall:
        raise ValueError("activity_ceiling: the train split has no images")

    def vote(table: dict[int, int]) -> int:
        return min(table, key=lambda a: (-table[a], a))

    default = vote(overall)
    seen: dict[tuple[int, ...], dict[int, int]] = {}
    correct = n = 0
    for mask, label in test:
        sig = _signature(mask, merge_map, ignore_index)
        answer = vote(counts[sig]) if sig in counts else default
        correct += answer == int(label)
        n += 1
        seen.setdefault(sig, {})
        seen[sig][int(label)] = seen[sig].get(int(label), 0) + 1
    if n == 0:
        raise ValueError("activity_ceiling: the test split has no images")
    rows = [{"classes": sig, "test_counts": dict(sorted(table.items())),
             "answer": vote(counts[sig]) if sig in counts else default} for sig, table in seen.items()]
    return {"accuracy": correct / n, "n_test": n, "signatures": rows}
