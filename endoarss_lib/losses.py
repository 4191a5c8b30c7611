"""Task losses: cross-entropy for the activity, per-pixel cross-entropy for segmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["task_losses"]


def task_losses(outputs: dict[str, torch.Tensor], batch: dict, tasks, ignore_index: int = 255,
                label_smoothing: float = 0.0, class_weights: dict | None = None) -> dict[str, torch.Tensor]:
    """Raw (unweighted) loss of every task, as float32 scalars; segmentation logits are compared at label size."""
    losses = {}
    class_weights = class_weights or {}
    if "cls" in tasks:
        losses["cls"] = F.cross_entropy(outputs["cls"].float(), batch["label"], weight=class_weights.get("cls"),
                                        label_smoothing=label_smoothing)
    if "seg" in tasks:
        logits, mask = outputs["seg"].float(), batch["mask"]
        if logits.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"seg logits {tuple(logits.shape[-2:])} and masks {tuple(mask.shape[-2:])} differ in size")
        losses["seg"] = F.cross_entropy(logits, mask, weight=class_weights.get("seg"), ignore_index=ignore_index,
                                        label_smoothing=label_smoothing)
    return losses
