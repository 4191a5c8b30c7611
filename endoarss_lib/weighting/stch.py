"""STCH: Lin, Zhang, Liu, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization" (ICML 2024).

A loss-level method (one plain backward; no per-task gradients). Epochs are counted from 0 and set with
``set_epoch``:

* warm-up, epochs ``0 .. warmup_epochs - 1``: ``loss = sum_t log(L_t + 1e-20)``;
* during the **last** warm-up epoch (``warmup_epochs - 1``) the detached loss vectors are accumulated; the nadir
  ``z`` is their mean over that epoch's steps (fixed at the first step after the warm-up);
* from epoch ``warmup_epochs`` on: ``l_t = log(L_t / z_t + 1e-20)`` and
  ``loss = mu * logsumexp((l - max(l)) / mu) * T`` with ``max(l)`` **detached**: a constant shift for numerical
  stability (``mu * lse((l - c) / mu) = mu * lse(l / mu) - c``), so the gradient equals that of the smooth
  Tchebycheff ``mu * lse(l / mu) * T``; only the logged value is shifted.

Task weights returned = the effective ``d loss / d L_t`` (detached): ``1 / (L_t + 1e-20)`` in the warm-up,
``T softmax(l / mu)_t / (L_t + 1e-20 z_t)`` afterwards.

Deviation from LibMTL, on purpose (docs/training.md: "during the last warm-up epoch accumulate"): LibMTL accumulates
during epoch ``== warmup_epoch`` and switches at ``warmup_epoch + 1`` (warmup + 1 log-loss epochs); here the
warm-up has exactly ``warmup_epochs`` epochs. ``warmup_convention="libmtl"`` reproduces LibMTL (the ``released``
preset uses it). If no step was taken in the last warm-up epoch (the epochs jumped) the first step after the warm-up
raises ``RuntimeError``.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .base import LossWeighting, int_param, real_param

__all__ = ["STCH"]

LOG_EPS = 1e-20


WARMUP_CONVENTIONS = ("spec", "libmtl")


class STCH(LossWeighting):
    """STCH (see module docstring). Args: ``mu`` > 0 the smoothing (default 1.0), ``warmup_epochs`` >= 1
    (default 4), ``warmup_convention``: ``"spec"`` (exactly ``warmup_epochs`` log-loss epochs, the nadir from the
    last of them) or ``"libmtl"`` (LibMTL's and the released code's: log-loss for epochs ``0 .. warmup_epochs``,
    i.e. one more, the nadir accumulated during epoch ``warmup_epochs``, the smooth Tchebycheff from
    ``warmup_epochs + 1``)."""

    name = "STCH"

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4, warmup_convention: str = "spec") -> None:
        super().__init__()
        self.mu = real_param("mu", mu, low=0.0, low_open=True)
        self.warmup_epochs = int_param("warmup_epochs", warmup_epochs, low=1)
        if warmup_convention not in WARMUP_CONVENTIONS:
            raise ValueError(f"warmup_convention must be one of {WARMUP_CONVENTIONS}, got {warmup_convention!r}")
        self.warmup_convention = warmup_convention
        self.nadir: Tensor | None = None
        self.loss_sum: Tensor | None = None
        self.loss_count = 0

    @property
    def hparams(self) -> dict[str, Any]:
        return {"mu": self.mu, "warmup_epochs": self.warmup_epochs, "warmup_convention": self.warmup_convention}

    @property
    def log_epochs(self) -> int:
        """Number of log-loss (warm-up) epochs: ``warmup_epochs``, one more under LibMTL's convention."""
        return self.warmup_epochs + (self.warmup_convention == "libmtl")

    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.log_epochs

    def set_epoch(self, epoch: int, num_epochs: int | None = None) -> None:
        super().set_epoch(epoch, num_epochs)
        if num_epochs is not None and self.log_epochs >= num_epochs:
            warnings.warn(f"STCH: {self.log_epochs} warm-up epochs >= num_epochs={num_epochs}: the smooth "
                          "Tchebycheff loss is never used (log-loss warm-up only)", stacklevel=2)

    def _advance(self, losses: Tensor) -> None:
        losses = losses.detach()
        if self.epoch == self.log_epochs - 1:
            acc = losses.to(torch.float64 if losses.dtype == torch.float64 else torch.float32)
            if self.loss_sum is None:
                self.loss_sum = acc.clone()
            else:
                if self.loss_sum.shape != acc.shape:
                    raise ValueError(f"losses have length {acc.numel()} but earlier steps had "
                                     f"{self.loss_sum.numel()}")
                self.loss_sum = self.loss_sum.to(acc.device) + acc
            self.loss_count += 1
        elif not self.in_warmup and self.nadir is None:
            if self.loss_count == 0 or self.loss_sum is None:
                raise RuntimeError(
                    f"STCH: no nadir: no step was taken during the last warm-up epoch ({self.log_epochs - 1}) "
                    f"before epoch {self.epoch}; call set_epoch(epoch) every epoch (or restore the state_dict)")
            self.nadir = self.loss_sum / self.loss_count
        self.step += 1

    def _scalarise(self, losses: Tensor) -> Tensor:
        if self.in_warmup:
            return torch.log(losses + LOG_EPS).sum()
        if self.nadir is None:
            raise RuntimeError("STCH: the nadir is not set yet (no step taken after the warm-up)")
        if self.nadir.numel() != losses.numel():
            raise ValueError(f"losses have length {losses.numel()} but the nadir has {self.nadir.numel()}")
        z = self.nadir.to(device=losses.device, dtype=losses.dtype)
        l = torch.log(losses / z + LOG_EPS)
        shift = l.detach().max()
        return self.mu * torch.logsumexp((l - shift) / self.mu, dim=0) * losses.numel()

    def _extra_state(self) -> dict[str, Any]:
        return {"nadir": self.nadir, "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.nadir, self.loss_sum, self.loss_count = state["nadir"], state["loss_sum"], int(state["loss_count"])
