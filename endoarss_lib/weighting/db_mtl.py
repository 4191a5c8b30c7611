"""DB-MTL: Lin, Ye, Xu, Shi, Kwok, "Dual-Balancing for Multi-Task Learning" (arXiv:2308.12029, 2023).

Loss-scale balancing: every task is trained on ``log(L_t + 1e-8)``; its gradient is computed here from the raw-loss
gradient as ``g_t = grad L_t / (L_t + 1e-8)`` (``grads`` are always raw-loss gradients). Gradient-magnitude
balancing (shared parameters only): an EMA buffer ``m_t <- b m_t + (1 - b) g_t`` with ``b = beta / step^beta_sigma``
(steps counted from 1), then every task is rescaled to the largest norm,
``alpha_t = max_s ||m_s|| / (||m_t|| + 1e-8)``, and the shared gradient is ``sum_t alpha_t m_t``.

Conventions (LibMTL's): the buffer starts at **zeros** (so after the first step ``m = (1 - beta) g``; the common
factor cancels in the direction, not in the magnitude); task weights returned = ``alpha``. Task-specific parameters
(heads) receive the gradient of the log-loss, ``grad L_t / (L_t + 1e-8)`` (``head_weights``), as in LibMTL and the
paper. A zero task gradient gives ``m_t = 0`` and a huge but finite ``alpha_t`` (``max / 1e-8``) that multiplies a
zero vector: no NaN.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import GradWeighting, as_loss_vector, check_task_inputs, real_param

__all__ = ["DBMTL", "db_mtl"]

LOG_EPS = 1e-8   # inside the log-loss, log(L + 1e-8)
NORM_EPS = 1e-8  # in alpha's denominator


def db_mtl(grads: Tensor, losses: Tensor, buffer: Tensor | None = None, step: int = 1, beta: float = 0.9,
           beta_sigma: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One DB-MTL step as a pure function.

    Args: ``grads`` (T x P) raw-loss gradients of the trainable shared parameters; ``losses`` (T); ``buffer`` the
    EMA state (T x P, ``None`` = zeros); ``step`` the 1-based step number.
    Returns ``(shared_grad [P], alpha [T], new_buffer [T x P])``.
    """
    g, l = check_task_inputs(grads, losses)
    log_grads = g / (l + LOG_EPS)[:, None]
    if buffer is None:
        buffer = torch.zeros_like(log_grads)
    elif buffer.shape != log_grads.shape:
        raise ValueError(f"buffer has shape {tuple(buffer.shape)}, expected {tuple(log_grads.shape)} (T x P)")
    b = beta / float(step) ** beta_sigma
    new_buffer = b * buffer.to(device=g.device, dtype=g.dtype) + (1.0 - b) * log_grads
    norms = new_buffer.norm(dim=1)
    alpha = norms.max() / (norms + NORM_EPS)
    return alpha @ new_buffer, alpha, new_buffer


class DBMTL(GradWeighting):
    """DB-MTL (see module docstring). Args: ``beta`` EMA coefficient in [0, 1) (default 0.9), ``beta_sigma`` >= 0
    its decay exponent, ``beta / step^beta_sigma`` (default 0: constant)."""

    name = "DB-MTL"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        self.beta = real_param("beta", beta, low=0.0, high=1.0, high_open=True)
        self.beta_sigma = real_param("beta_sigma", beta_sigma, low=0.0)
        self.buffer: Tensor | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        g, l = check_task_inputs(grads, losses)
        buffer = self.buffer
        if buffer is not None and buffer.shape != g.shape:
            raise ValueError(f"grads has shape {tuple(g.shape)} but the EMA buffer has {tuple(buffer.shape)}: "
                             "the task count and trainable shared parameters must not change during a run")
        shared_grad, alpha, self.buffer = db_mtl(g, l, buffer, self.step + 1, self.beta, self.beta_sigma)
        self.step += 1
        return shared_grad, alpha

    def head_weights(self, losses: Tensor) -> Tensor:
        losses = as_loss_vector(losses).detach()
        return 1.0 / (losses + LOG_EPS)

    def combine_losses(self, losses: Tensor | Sequence[Tensor]) -> Tensor:
        """``sum_t log(L_t + 1e-8)``: what the heads are trained on (stateless)."""
        return torch.log(as_loss_vector(losses) + LOG_EPS).sum()

    def _extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"]
