"""MoCo: Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in Multi-objective Learning:
A Provably Convergent Approach" (ICLR 2023).

Per step (``step`` counted from 1), with ``G`` the (T x P) raw-loss gradients of the trainable shared parameters:

* normalise ``g_t <- g_t / (||g_t|| + 1e-8) * L_t``;
* track ``y <- y - beta / step^beta_sigma * (y - G)``;
* ``lambda <- softmax(lambda - gamma / step^gamma_sigma * (y y^T + rho I) lambda)``;
* shared gradient ``y^T lambda``; task weights ``lambda`` (on the simplex).

Conventions (LibMTL's, from the authors' code): ``y`` starts at **zeros** (T x P), ``lambda`` at ``1/T``; the
``+ 1e-8`` guard makes a zero gradient stay zero. Heads receive their own raw-loss gradient (weight 1).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import GradWeighting, check_task_inputs, real_param

__all__ = ["MoCo", "moco"]

NORM_EPS = 1e-8


def moco(grads: Tensor, losses: Tensor, y: Tensor | None = None, lambd: Tensor | None = None, step: int = 1,
         beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
         rho: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One MoCo step as a pure function: returns ``(shared_grad [P], new_lambda [T], new_y [T x P])``.
    ``y = None`` means zeros, ``lambd = None`` means ``1/T``; ``step`` is 1-based."""
    g, l = check_task_inputs(grads, losses)
    t = g.shape[0]
    g = g / (g.norm(dim=1, keepdim=True) + NORM_EPS) * l[:, None]
    if y is None:
        y = torch.zeros_like(g)
    elif y.shape != g.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}, expected {tuple(g.shape)} (T x P)")
    if lambd is None:
        lambd = torch.full((t,), 1.0 / t, dtype=g.dtype, device=g.device)
    elif lambd.shape != (t,):
        raise ValueError(f"lambd has shape {tuple(lambd.shape)}, expected ({t},)")
    y = y.to(device=g.device, dtype=g.dtype)
    lambd = lambd.to(device=g.device, dtype=g.dtype)
    b = beta / float(step) ** beta_sigma
    c = gamma / float(step) ** gamma_sigma
    y = y - b * (y - g)
    eye = torch.eye(t, dtype=g.dtype, device=g.device)
    lambd = torch.softmax(lambd - c * ((y @ y.T + rho * eye) @ lambd), dim=-1)
    return y.T @ lambd, lambd, y


class MoCo(GradWeighting):
    """MoCo (see module docstring). Args: ``beta`` in (0, 1] the tracking rate of y (0.5), ``beta_sigma`` >= 0 its
    decay (0.5), ``gamma`` >= 0 the step size of lambda (0.1), ``gamma_sigma`` >= 0 its decay (0.5), ``rho`` >= 0 the
    l2 regulariser of lambda's update (0)."""

    name = "MoCo"

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
                 rho: float = 0.0) -> None:
        super().__init__()
        self.beta = real_param("beta", beta, low=0.0, low_open=True, high=1.0)
        self.beta_sigma = real_param("beta_sigma", beta_sigma, low=0.0)
        self.gamma = real_param("gamma", gamma, low=0.0)
        self.gamma_sigma = real_param("gamma_sigma", gamma_sigma, low=0.0)
        self.rho = real_param("rho", rho, low=0.0)
        self.y: Tensor | None = None
        self.lambd: Tensor | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma, "gamma": self.gamma,
                "gamma_sigma": self.gamma_sigma, "rho": self.rho}

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        g, l = check_task_inputs(grads, losses)
        if self.y is not None and self.y.shape != g.shape:
            raise ValueError(f"grads has shape {tuple(g.shape)} but MoCo's y has {tuple(self.y.shape)}: the task "
                             "count and trainable shared parameters must not change during a run")
        shared_grad, self.lambd, self.y = moco(g, l, self.y, self.lambd, self.step + 1, self.beta, self.beta_sigma,
                                               self.gamma, self.gamma_sigma, self.rho)
        self.step += 1
        return shared_grad, self.lambd.clone()

    def _extra_state(self) -> dict[str, Any]:
        return {"y": self.y, "lambd": self.lambd}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.y, self.lambd = state["y"], state["lambd"]
