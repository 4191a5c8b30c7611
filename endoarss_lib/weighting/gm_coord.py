"""GM-Coord: UMD's Gradient-guided Modality Coordination (Zhang et al., "Unified Multi-modal Diagnostic Framework with
Reconstruction Pre-training and Heterogeneity-combat Tuning", arXiv:2404.06057, 2024), with **tasks** in place of
modalities.

UMD states that GM-Coord "adjusts the gradient weights according to the dynamic optimization status of different
modalities"; the paper's exact formula is not in the text this project has. The closest public form is OGM-GE
(Peng et al., CVPR 2022, "Balanced Multimodal Learning via On-the-fly Gradient Modulation"), which UMD builds on;
it is implemented here:

* a progress score per task from the current batch, ``s_t``: for ``cls`` the mean softmax probability of the true
  activity, for ``seg`` the mean true-class probability over the valid pixels (the engine computes them with
  :func:`endoarss_lib.training.losses.progress_scores` and hands them over with :meth:`GMCoord.set_progress`; without
  them the method falls back to ``exp(-L_t)``, the *geometric* mean true-class probability of a cross-entropy loss);
* optionally ``relative=True``: each score divided by its value at the first modulated step (the two tasks' raw
  scores live on different scales), and ``momentum`` > 0: an exponential moving average of the scores (0 = the
  current batch only, as OGM-GE);
* the ratio of a task's score to the mean of the others', ``rho_t = s_t / mean_{u != t} s_u`` (for two tasks
  ``rho_cls = s_cls / s_seg`` and ``rho_seg = 1 / rho_cls``); a **dominant** task (``rho_t > 1``) gets the
  coefficient ``k_t = 1 - tanh(alpha * rho_t)``, the others 1 (OGM-GE's rule, discontinuous at rho = 1 as in its
  code); equal progress gives ``k = (1, ..., 1)``;
* an epoch window ``start_epoch <= epoch <= end_epoch`` (``end_epoch=None``: to the end); outside it ``k = 1``;
* the coefficients are **detached** task weights, applied to the losses (``apply_to="losses"``: shared parameters
  and heads see ``sum_t k_t L_t``) or to the shared-parameter gradients only (``apply_to="shared"``: the heads keep
  ``sum_t L_t``);
* optional Gaussian noise (the GE, "generalisation enhancement", variant): ``noise > 0`` adds
  ``N(0, (noise * std(g_p))^2)`` to the modulated gradient ``g_p`` of every trainable shared parameter tensor ``p``
  while modulation is active (OGM-GE uses ``noise = 1``); drawn from a seeded CPU generator (``seed``) whose state is
  part of ``state_dict``.

``combine(G, L)`` returns ``k @ G`` (+ noise) and ``k`` (the pure gradient-space form, for tests);
``combine_losses(L)`` returns ``sum_t k_t L_t`` with ``k`` detached. Each call of ``combine`` / ``combine_losses`` /
``backward`` is one step: it consumes the scores given by :meth:`set_progress` (if any), updates the EMA / baseline
and the per-epoch summary (:meth:`epoch_log`: mean scores and coefficients of the epoch, for the run log).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..tasks import get_task
from .base import (Weighting, _add_grad, _flatten_task_params, _unique_trainable, as_loss_vector,
                   backward_task_specific, check_task_inputs, int_param, real_param)
from .task_grads import task_gradients, weighted_rows

__all__ = ["GMCoord", "gm_coord_coefficients"]

RHO_TOL = 1e-12


def gm_coord_coefficients(scores: Tensor, alpha: float = 0.1) -> tuple[Tensor, Tensor]:
    """``(k, rho)`` for progress scores (T,): ``rho_t = s_t / mean_{u != t} s_u``; ``k_t = 1 - tanh(alpha rho_t)``
    where ``rho_t > 1`` (the dominant task; ``1 + 1e-12`` to absorb rounding), else 1. One task: ``k = 1``.
    Non-finite or non-positive scores: ``k = 1`` (nothing to compare)."""
    s = scores.detach().to(torch.float64)
    t = s.numel()
    if t < 2 or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        return torch.ones_like(s), torch.ones_like(s)
    others = torch.stack([s[torch.arange(t) != i].mean() for i in range(t)])
    rho = s / others
    # dominant: rho > 1 beyond rounding (equal scores of three or more tasks can give 1 + 1 ulp)
    k = torch.where(rho > 1 + RHO_TOL, 1.0 - torch.tanh(alpha * rho), torch.ones_like(rho))
    return k, rho


class GMCoord(Weighting):
    """GM-Coord (see module docstring).

    Args: ``alpha`` (> 0, default 0.1), ``relative`` (divide by the scores at the first modulated step),
    ``momentum`` in [0, 1) (EMA of the scores; 0 = current batch), ``noise`` >= 0 (GE noise scale; 0 = off),
    ``start_epoch`` / ``end_epoch`` (inclusive window, epochs from 0; ``end_epoch=None`` = no end),
    ``apply_to`` ``"losses"`` | ``"shared"``, ``seed`` (noise generator).
    """

    name = "GM-Coord"
    needs_task_grads = False

    def __init__(self, alpha: float = 0.1, relative: bool = False, momentum: float = 0.0, noise: float = 0.0,
                 start_epoch: int = 0, end_epoch: int | None = None, apply_to: str = "losses", seed: int = 0):
        super().__init__()
        self.alpha = real_param("alpha", alpha, low=0.0, low_open=True)
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {relative!r}")
        self.relative = relative
        self.momentum = real_param("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.noise = real_param("noise", noise, low=0.0)
        self.start_epoch = int_param("start_epoch", start_epoch, low=0)
        self.end_epoch = None if end_epoch is None else int_param("end_epoch", end_epoch, low=0)
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch={end_epoch} must be >= start_epoch={start_epoch}")
        if apply_to not in ("losses", "shared"):
            raise ValueError(f"apply_to must be 'losses' or 'shared', got {apply_to!r}")
        self.apply_to = apply_to
        self.seed = int_param("seed", seed, low=0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._pending: Tensor | None = None  # scores handed over for the next step (not state: set every step)
        self.ema: Tensor | None = None
        self.baseline: Tensor | None = None
        self.epoch_sums: Tensor | None = None  # (3, T): sums of raw scores, used scores, k over this epoch's steps
        self.epoch_steps = 0
        self.epoch_active = 0
        self.summary_epoch = 0
        self.last_weights: Tensor | None = None
        self.last_rho: Tensor | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "relative": self.relative, "momentum": self.momentum, "noise": self.noise,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch, "apply_to": self.apply_to,
                "seed": self.seed}

    # -- inputs ------------------------------------------------------------------------------------------------
    def observe(self, outputs: dict[str, Tensor], batch: dict, tasks: Sequence[str], ignore_index: int = 255) -> None:
        """The engine's hook before each backward: the batch's progress scores (:meth:`Task.progress`)."""
        self.set_progress(torch.stack([get_task(t).progress(outputs[t], batch, ignore_index) for t in tasks]))

    def set_progress(self, scores: Tensor | Sequence[float]) -> None:
        """The progress scores (T,) of the coming step (consumed by the next step)."""
        s = torch.as_tensor(scores).detach().reshape(-1)
        if not s.is_floating_point():
            s = s.float()
        self._pending = s.cpu().to(torch.float64)

    @property
    def active(self) -> bool:
        """Whether the current epoch is inside the modulation window."""
        return self.epoch >= self.start_epoch and (self.end_epoch is None or self.epoch <= self.end_epoch)

    def set_epoch(self, epoch: int, num_epochs: int | None = None) -> None:
        super().set_epoch(epoch, num_epochs)
        if epoch != self.summary_epoch:  # a new epoch: start its summary afresh
            self.summary_epoch, self.epoch_sums, self.epoch_steps, self.epoch_active = epoch, None, 0, 0

    # -- one step ----------------------------------------------------------------------------------------------
    def _advance(self, losses: Tensor) -> Tensor:
        """One step: scores -> (EMA, baseline) -> k (float64 on the CPU, detached); updates the epoch summary."""
        raw_loss = losses.detach().cpu().to(torch.float64)
        scores = self._pending if self._pending is not None else torch.exp(-raw_loss)
        self._pending = None
        if scores.numel() != raw_loss.numel():
            raise ValueError(f"{scores.numel()} progress scores for {raw_loss.numel()} task losses")
        if self.momentum > 0 and self.ema is not None and bool(torch.isfinite(scores).all()):
            self.ema = self.momentum * self.ema + (1.0 - self.momentum) * scores
        elif self.ema is None or self.momentum == 0:
            self.ema = scores.clone()
        used = self.ema
        if self.active:
            if self.relative:
                if self.baseline is None and bool(torch.isfinite(used).all()) and bool((used > 0).all()):
                    self.baseline = used.clone()
                if self.baseline is not None:
                    used = used / self.baseline
            k, rho = gm_coord_coefficients(used, self.alpha)
        else:
            k, rho = torch.ones_like(used), torch.ones_like(used)
        self.step += 1
        row = torch.stack([scores, used, k])
        self.epoch_sums = row.clone() if self.epoch_sums is None else self.epoch_sums + row
        self.epoch_steps += 1
        self.epoch_active += int(self.active)
        self.last_weights, self.last_rho = k.clone(), rho.clone()
        return k

    def _noise_like(self, grad: Tensor) -> Tensor:
        std = grad.detach().float().std().item() if grad.numel() > 1 else 0.0
        draw = torch.randn(grad.shape, generator=self.generator, dtype=torch.float32)
        return (draw * (self.noise * std + 1e-8)).to(device=grad.device, dtype=grad.dtype)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``(k @ G [+ noise], k)`` -- one step on the raw-loss task gradients of the shared parameters."""
        g, l = check_task_inputs(grads, losses)
        k = self._advance(l).to(device=g.device, dtype=g.dtype)
        shared = k @ g
        if self.noise > 0 and self.active:
            shared = shared + self._noise_like(shared)
        return shared, k

    def combine_losses(self, losses: Tensor | Sequence[Tensor]) -> Tensor:
        """``sum_t k_t L_t`` with detached ``k`` (one step)."""
        losses = as_loss_vector(losses)
        k = self._advance(losses).to(device=losses.device, dtype=losses.dtype)
        return (k * losses).sum()

    def backward(self, losses: Tensor | Sequence[Tensor], shared_params: Iterable[Tensor],
                 task_params: Iterable[Any] | None = None) -> Tensor:
        """One step instead of ``loss.backward()``; returns ``k`` (detached).

        ``apply_to="losses"`` without noise: a single backward of ``sum_t k_t L_t``. Otherwise the shared
        parameters get ``d(sum_t k_t L_t)/dtheta`` (+ noise) and the task-specific ones ``d(sum_t h_t L_t)/dtheta``
        with ``h = k`` (losses: the same single backward) or ``h = 1`` (shared: both from the per-task gradients of
        :func:`~endoarss_lib.weighting.task_grads.task_gradients`); ``task_params=None`` treats every other
        trainable parameter the losses reach as task-specific (as :class:`GradWeighting` does; one more backward).
        """
        losses = as_loss_vector(losses)
        k = self._advance(losses).to(device=losses.device, dtype=losses.dtype)
        shared_obj = (k * losses).sum()
        noisy = self.noise > 0 and self.active
        if self.apply_to == "losses" and not noisy:
            shared_obj.backward()
            return k
        shared = _unique_trainable(shared_params, "shared_params")
        heads = None if task_params is None else _unique_trainable(_flatten_task_params(task_params), "task_params")
        if heads is None:  # the task-specific parameters are unknown: one more full backward, shared set aside
            head_obj = shared_obj if self.apply_to == "losses" else losses.sum()
            grads = torch.autograd.grad(shared_obj, shared, retain_graph=True, allow_unused=True) if shared else ()
            backward_task_specific(head_obj, shared, None)
            head_grads: list = []
        elif self.apply_to == "losses":  # noisy: one backward of sum k L into shared and heads
            params = shared + heads
            grads = torch.autograd.grad(shared_obj, params, allow_unused=True) if params else ()
            grads, head_grads = grads[:len(shared)], grads[len(shared):]
        else:  # shared see sum k L, heads sum L: both from the per-task gradients of one set of backwards
            rows = task_gradients(losses, shared + heads)
            grads = [weighted_rows(r, k) for r in rows[:len(shared)]]
            head_grads = [weighted_rows(r, torch.ones_like(k)) for r in rows[len(shared):]]
        with torch.no_grad():
            for p, g in zip(heads or [], head_grads):
                _add_grad(p, g)
            for p, g in zip(shared, grads):
                if g is None:
                    continue
                if noisy:
                    g = g + self._noise_like(g)
                _add_grad(p, g.detach())
        return k

    # -- logging / state ---------------------------------------------------------------------------------------
    def epoch_log(self, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Mean raw score, used (EMA / relative) score and coefficient of each task over this epoch's steps, and the
        share of steps with modulation active: ``gm_score_<task>``, ``gm_k_<task>``, ``gm_active``."""
        if self.epoch_sums is None or self.epoch_steps == 0:
            return {}
        names = list(tasks) if tasks is not None else [str(i) for i in range(self.epoch_sums.shape[1])]
        mean = (self.epoch_sums / self.epoch_steps).tolist()
        out = {}
        for i, t in enumerate(names):
            out[f"gm_score_{t}"] = mean[0][i]
            out[f"gm_k_{t}"] = mean[2][i]
        out["gm_active"] = self.epoch_active / self.epoch_steps
        return {k: float(v) for k, v in out.items()}

    def _extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema, "baseline": self.baseline, "epoch_sums": self.epoch_sums,
                "epoch_steps": self.epoch_steps, "epoch_active": self.epoch_active,
                "summary_epoch": self.summary_epoch, "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.ema, self.baseline, self.epoch_sums = state["ema"], state["baseline"], state["epoch_sums"]
        self.epoch_steps, self.epoch_active = int(state["epoch_steps"]), int(state["epoch_active"])
        self.summary_epoch = int(state["summary_epoch"])
        self.generator.set_state(state["generator"])
        self._pending = None
