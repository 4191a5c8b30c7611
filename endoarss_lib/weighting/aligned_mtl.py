"""Aligned-MTL: Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task Learning"
(CVPR 2023).

With ``G`` the (T x P) task-gradient matrix of the trainable shared parameters: ``M = G G^T = V diag(lambda) V^T``;
eigenvalues ``<= max(lambda) * T * eps`` are dropped (rank truncation); over the kept eigenpairs
``B = sqrt(lambda_min) V diag(lambda^-1/2) V^T`` (``lambda_min`` = the smallest **kept** eigenvalue), i.e.
``B = sqrt(lambda_min) M^{-1/2}`` on the span of G. ``alpha = B.sum(0)``; the shared gradient is
``sum_t alpha_t g_t = 1^T B G``.

Properties (for linearly independent gradients): the aligned matrix ``B G`` has orthogonal rows of equal norm
``sqrt(lambda_min)`` (condition number 1), and the combined direction ``d`` has equal projections
``sqrt(lambda_min)`` on the orthonormal "independent components" ``U = M^{-1/2} G``, i.e. ``U d = sqrt(lambda_min) 1``
(for orthogonal gradients: ``<g_t / ||g_t||, d> = sqrt(lambda_min)`` for every t).

Conventions: ``eps`` defaults to ``torch.finfo(dtype).eps`` of the compute dtype (float32: 1.19e-7), as LibMTL
(``torch.finfo().eps``) and the official code; ``T`` is ``max(M.shape)``. No state. Task weights returned = ``alpha``.
Heads receive their own raw-loss gradient (weight 1). A zero task gradient has eigenvalue 0 (dropped) and gets
``alpha_t = 0``; if every gradient is zero the result is a zero gradient and zero weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import GradWeighting, check_task_inputs, real_param

__all__ = ["AlignedMTL", "aligned_mtl", "alignment_matrix"]


def alignment_matrix(grads: Tensor, eps: float | None = None) -> Tensor:
    """The (T x T) matrix ``B`` of Aligned-MTL for a (T x P) gradient matrix (zeros if every gradient is zero)."""
    if grads.dim() != 2:
        raise ValueError(f"grads must be 2-D (T x P), got shape {tuple(grads.shape)}")
    t = grads.shape[0]
    m = grads @ grads.T
    lam, v = torch.linalg.eigh(m)
    if eps is None:
        eps = torch.finfo(m.dtype).eps
    tol = lam.max() * t * eps
    keep = lam > tol
    if not bool(keep.any()):
        return torch.zeros_like(m)
    lam_k, v_k = lam[keep], v[:, keep]
    return lam_k.min().sqrt() * ((v_k * lam_k.rsqrt()) @ v_k.T)


def aligned_mtl(grads: Tensor, losses: Tensor | None = None, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Aligned-MTL as a pure function: ``(shared_grad [P], alpha [T])``. ``losses`` is only shape-checked."""
    if losses is None:
        losses = torch.ones(grads.shape[0] if grads.dim() == 2 else 0, dtype=grads.dtype, device=grads.device)
    g, _ = check_task_inputs(grads, losses)
    alpha = alignment_matrix(g, eps).sum(0)
    return alpha @ g, alpha


class AlignedMTL(GradWeighting):
    """Aligned-MTL (see module docstring). Arg: ``eps`` (> 0) of the rank tolerance ``max(lambda) * T * eps``;
    ``None`` (default) = machine epsilon of the compute dtype."""

    name = "Aligned-MTL"

    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = None if eps is None else real_param("eps", eps, low=0.0, low_open=True, high=1.0, high_open=True)

    @property
    def hparams(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        g, l = check_task_inputs(grads, losses)
        out = aligned_mtl(g, l, self.eps)
        self.step += 1
        return out
