"""EW: equal weighting, ``loss = sum_t L_t`` (the usual multi-task baseline; Caruana, 1997, "Multitask Learning").

A loss-level method: one plain backward of the summed losses; task weights are all 1 and ``combine(G, L)`` is
``G.sum(0)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeighting

__all__ = ["EW"]


class EW(LossWeighting):
    """Equal weighting: ``sum_t L_t``; weights (1, ..., 1). No hyper-parameters."""

    name = "EW"

    def _scalarise(self, losses: Tensor) -> Tensor:
        return losses.sum()

    def _loss_weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses.detach())
