"""The pieces of the self-distillation loss that are not a cross-entropy: the teacher targets by Sinkhorn-Knopp
(:func:`sinkhorn_knopp`, DINOv2's centering) and the KoLeo regulariser (:func:`_koleo`, Sablayrolles et al., 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sinkhorn_knopp"]


def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) by Sinkhorn-Knopp (SwAV; DINOv2's teacher centering): rows sum to 1, prototypes used
    equally over the batch. Unlike DINO's running centre it gives peaked, balanced targets from the first step."""
    q = torch.exp((logits - logits.max()) / temp).t()  # (K, N)
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def _koleo(z: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator term: -mean log(distance to the nearest neighbour) of normalised z."""
    z = F.normalize(z, dim=-1)
    d = torch.cdist(z, z)
    d = d + torch.eye(len(z), dtype=d.dtype) * 1e4
    return -torch.log(d.min(1).values + 1e-8).mean()
