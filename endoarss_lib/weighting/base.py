"""Common machinery of the multi-task weighting methods.

Two kinds of method share one interface (:class:`Weighting`):

* **loss-level** methods (EW, STCH; ``needs_task_grads = False``) only transform the task losses into one scalar
  (:meth:`Weighting.combine_losses`) and do one plain backward;
* **gradient** methods (DB-MTL, Aligned-MTL, MoCo; ``needs_task_grads = True``) combine the task-gradient matrix
  ``G`` (T x P: one row per task, over the **trainable shared** parameters only) into one shared gradient
  (:meth:`Weighting.combine`, also available as a pure function in each method's module).

``Weighting.backward`` is the training-time entry point the engine calls instead of ``loss.backward()``. Unlike
LibMTL (whose gradient buffers span every shared parameter, frozen ones included, and whose hyper-parameters come
from a global argparse namespace), hyper-parameters are constructor arguments and the gradient matrix covers only the
trainable shared parameters: frozen parameters never get a gradient.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .task_grads import rows_matrix, task_gradients, weighted_rows

__all__ = ["Weighting", "GradWeighting", "LossWeighting", "check_task_inputs", "as_loss_vector"]


# ---------------------------------------------------------------------------------------------------------------
# Input / hyper-parameter validation
# ---------------------------------------------------------------------------------------------------------------

def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (tests), float32 otherwise (also for bf16 / fp16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_loss_vector(losses: Tensor | Sequence[Tensor]) -> Tensor:
    """A 1-D tensor of T task losses from a tensor or a sequence of scalar tensors (keeps the autograd graph)."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses must be a 1-D tensor of T task losses, got shape {tuple(losses.shape)}")
        out = losses
    elif isinstance(losses, Sequence) and len(losses) > 0:
        items = [l if isinstance(l, Tensor) else torch.as_tensor(l) for l in losses]
        for i, l in enumerate(items):
            if l.numel() != 1:
                raise ValueError(f"losses[{i}] must be a scalar, got shape {tuple(l.shape)}")
        out = torch.stack([l.reshape(()) for l in items])
    else:
        raise TypeError(f"losses must be a 1-D tensor or a non-empty sequence of scalar tensors, got {type(losses)}")
    if out.numel() < 1:
        raise ValueError("losses must hold at least one task loss")
    if not out.is_floating_point():
        raise TypeError(f"losses must be floating point, got {out.dtype}")
    return out


def check_task_inputs(grads: Tensor, losses: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Validate ``grads`` (T x P) and ``losses`` (T); return detached copies in the compute dtype."""
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a torch.Tensor of shape (T, P), got {type(grads)}")
    if grads.dim() != 2:
        raise ValueError(f"grads must be 2-D (T tasks x P shared parameters), got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise TypeError(f"grads must be floating point, got {grads.dtype}")
    t = grads.shape[0]
    if t < 1:
        raise ValueError("grads must have at least one row (task)")
    losses = as_loss_vector(losses)
    if losses.numel() != t:
        raise ValueError(f"losses must have length T = {t} (one per row of grads), got length {losses.numel()}")
    dtype = compute_dtype(grads, losses)
    return grads.detach().to(dtype), losses.detach().to(device=grads.device, dtype=dtype)


def real_param(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real hyper-parameter inside [low, high] (open ends on request), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, Tensor) and value.numel() == 1):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def int_param(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def _clone_state(value: Any) -> Any:
    """Deep copy of a state value (tensors cloned bit-for-bit, containers recursed)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v) for v in value)
    return value


def _unique_trainable(params: Iterable[Any], what: str) -> list[torch.nn.Parameter]:
    out, seen = [], set()
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must contain tensors/parameters, got {type(p)}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _flatten_task_params(task_params: Iterable[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in task_params:
        if isinstance(item, Tensor):
            flat.append(item)
        else:
            flat.extend(item)
    return flat


# ---------------------------------------------------------------------------------------------------------------
# Base classes
# ---------------------------------------------------------------------------------------------------------------

class Weighting:
    """Base class of a weighting method. Hyper-parameters are constructor arguments (see each subclass).

    Interface (T tasks, P trainable shared parameters):

    * ``combine(grads: Tensor[T, P], losses: Tensor[T]) -> (shared_grad: Tensor[P], task_weights: Tensor[T])``:
      one optimisation step of the method on gradients of the **raw** task losses; stateful methods update their
      state (EMA buffers, step counters) inside. Outputs are detached, in float32 (float64 if an input is).
    * ``combine_losses(losses) -> scalar``: for loss-level methods, one step (the loss to backpropagate); for
      gradient methods, the stateless objective whose gradient the task-specific parameters (heads) receive.
    * ``backward(losses, shared_params, task_params=None) -> task_weights``: the training-time entry point.
    * ``set_epoch(epoch, num_epochs=None)``; ``state_dict()`` / ``load_state_dict()`` for bitwise resume.
    """

    name: str = "base"
    needs_task_grads: bool = False
    # Data parallel (endoarss_lib.training.distributed): a function averaging a tensor over the ranks, identically on
    # every rank. Set, ``backward`` combines the global batch's losses (and task-gradient matrix) instead of this rank's
    # share. None in a single process. Not state: never saved.
    global_mean = None

    def __init__(self) -> None:
        self.step = 0           # optimisation steps taken (equations count from 1: the first call uses step = 1)
        self.epoch = 0
        self.num_epochs: int | None = None

    # -- hyper-parameters / repr -------------------------------------------------------------------------------
    @property
    def hparams(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({hp})"

    # -- API ---------------------------------------------------------------------------------------------------
    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def combine_losses(self, losses: Tensor | Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def set_epoch(self, epoch: int, num_epochs: int | None = None) -> None:
        """Tell the method which epoch (counted from 0) the coming steps belong to. Only STCH uses it."""
        self.epoch = int_param("epoch", epoch, low=0)
        self.num_epochs = None if num_epochs is None else int_param("num_epochs", num_epochs, low=1)

    def backward(self, losses: Tensor | Sequence[Tensor], shared_params: Iterable[Tensor],
                 task_params: Iterable[Any] | None = None) -> Tensor:
        raise NotImplementedError

    # -- hooks the training engine calls (no method-specific probing in the engine) -----------------------------
    def observe(self, outputs: dict[str, Tensor], batch: dict, tasks: Sequence[str], ignore_index: int = 255) -> None:
        """Called before every :meth:`backward` with the batch's model outputs: a method that needs more than the
        losses reads it here (GM-Coord: the tasks' progress scores). Default: nothing."""

    def epoch_log(self, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Per-epoch summary columns for the run log (default: none)."""
        return {}

    # -- state -------------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise: step / epoch counters and the method's buffers (tensors cloned).
        Only plain types and tensors, so ``torch.load(..., weights_only=True)`` reads it."""
        state = {"name": self.name, "hparams": dict(self.hparams), "step": self.step, "epoch": self.epoch,
                 "num_epochs": self.num_epochs}
        state.update(self._extra_state())
        return _clone_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state)}")
        if state.get("name") != self.name:
            raise ValueError(f"state_dict of {state.get('name')!r} cannot be loaded into {self.name!r}")
        missing = [k for k in ("step", "epoch", "num_epochs", *self._extra_state()) if k not in state]
        if missing:
            raise KeyError(f"{self.name} state_dict is missing {missing}")
        if dict(state.get("hparams", {})) != dict(self.hparams):
            warnings.warn(f"{self.name}: loading state saved with hparams {state.get('hparams')} into an instance "
                          f"with {self.hparams}; keeping the instance's hyper-parameters", stacklevel=2)
        state = _clone_state(state)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.num_epochs = state["num_epochs"]
        self._load_extra_state(state)


class LossWeighting(Weighting):
    """A method that only transforms the losses: ``backward`` is ``combine_losses(losses).backward()``.

    ``combine(grads, losses)`` is its gradient-space equivalent (the chain rule): ``sum_t w_t g_t`` with
    ``w_t = d combine_losses / d L_t``. Subclasses implement ``_advance(losses)`` (the per-step state update),
    ``_scalarise(losses)`` (stateless given the state) and may override ``_loss_weights``.
    """

    needs_task_grads = False

    def _advance(self, losses: Tensor) -> None:
        self.step += 1

    def _scalarise(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def _loss_weights(self, losses: Tensor) -> Tensor:
        """``d _scalarise / d L_t`` at ``losses`` (detached), by autograd on a detached leaf copy."""
        with torch.enable_grad():
            x = losses.detach().clone().requires_grad_(True)
            (w,) = torch.autograd.grad(self._scalarise(x), x)
        return w.detach()

    def combine_losses(self, losses: Tensor | Sequence[Tensor]) -> Tensor:
        losses = as_loss_vector(losses)
        self._advance(losses.detach())
        return self._scalarise(losses)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        g, l = check_task_inputs(grads, losses)
        self._advance(l)
        w = self._loss_weights(l).to(g.dtype)
        return w @ g, w

    def backward(self, losses: Tensor | Sequence[Tensor], shared_params: Iterable[Tensor] | None = None,
                 task_params: Iterable[Any] | None = None) -> Tensor:
        """``combine_losses(losses).backward()`` (one plain backward; the parameter lists are not needed).
        Returns the effective task weights ``d loss / d L_t`` (detached).

        Under data parallel (:attr:`global_mean` set) the step and the weights are those of the global batch's
        losses, and ``sum_t w_t L_t`` of this rank's share is backpropagated: averaged over the ranks, its gradient
        is the global batch's ``d combine_losses / d theta`` (the chain rule)."""
        losses = as_loss_vector(losses)
        if self.global_mean is None:
            loss = self.combine_losses(losses)
            weights = self._loss_weights(losses.detach())
            loss.backward()
            return weights
        batch_losses = self.global_mean(losses.detach())
        self._advance(batch_losses)
        weights = self._loss_weights(batch_losses)
        (weights.to(losses.dtype) * losses).sum().backward()
        return weights


def backward_task_specific(objective: Tensor, shared: list, heads: list | None) -> None:
    """Backpropagate ``objective`` into the task-specific parameters only (``heads``; None: every parameter but
    ``shared``, whose gradients are set aside and restored), so the shared ones are not touched twice."""
    if not objective.requires_grad:
        return
    if heads is None:
        saved = [p.grad for p in shared]
        for p in shared:
            p.grad = None
        torch.autograd.backward(objective)
        for p, g in zip(shared, saved):
            p.grad = g
    elif heads:
        torch.autograd.backward(objective, inputs=heads)


class GradWeighting(Weighting):
    """A gradient-manipulation method working on the task-gradient matrix of the trainable shared parameters.

    Task-specific parameters (heads, task adapters) follow LibMTL and docs/training.md ("heads keep their own task's
    gradient"): they receive the gradient of :meth:`combine_losses`, i.e. ``h_t * dL_t/dtheta`` with
    ``h_t = head_weights(losses)[t]`` -- 1 for Aligned-MTL and MoCo, ``1 / (L_t + 1e-8)`` for DB-MTL (the gradient
    of its log-loss). The method's task weights (alpha / lambda) act on the shared parameters only.
    """

    needs_task_grads = True

    def head_weights(self, losses: Tensor) -> Tensor:
        """Weights ``h_t`` of the raw-loss gradients the task-specific parameters receive (detached)."""
        losses = as_loss_vector(losses).detach()
        return torch.ones_like(losses)

    def combine_losses(self, losses: Tensor | Sequence[Tensor]) -> Tensor:
        """Stateless: the objective whose gradient the heads receive (``sum_t h_t L_t`` up to a constant)."""
        return as_loss_vector(losses).sum()

    def backward(self, losses: Tensor | Sequence[Tensor], shared_params: Iterable[Tensor],
                 task_params: Iterable[Any] | None = None) -> Tensor:
        """Training-time step, called instead of ``loss.backward()``.

        1. per-task gradients of the raw losses w.r.t. the trainable shared parameters only, by
           :func:`~endoarss_lib.weighting.task_grads.task_gradients` (one backward per task started from the task's
           own loss, or one batched backward; unused -> zeros), flattened into ``G`` (T x P, P = number of
           **trainable** shared parameter elements; parameters with ``requires_grad=False`` in ``shared_params`` are
           skipped and never get a gradient);
        2. ``shared_grad, weights = combine(G, losses)``, **added** to ``p.grad`` (gradient accumulation works);
        3. the task-specific parameters get the gradient of :meth:`combine_losses`, ``sum_t h_t dL_t/dtheta`` (see
           the class docstring), added to their ``.grad``. With ``task_params`` (a list per task, or a flat list)
           they are inputs of the same per-task backward as the shared parameters (no extra backward): each gets
           ``sum_t h_t`` times the task gradients that reach it. With ``task_params=None`` every other trainable
           parameter the losses reach is treated as task-specific: a further full backward of
           :meth:`combine_losses` is done while the shared parameters' gradients are set aside, then restored (so
           they are not touched twice).

        Under data parallel (:attr:`global_mean` set), ``G`` and the losses are averaged over the ranks before
        step 2 (the global batch's), and the head weights ``h`` come from the global losses; the task-specific
        gradients stay this rank's share, for the engine to average.

        Each call is one optimisation step of the method (an EMA step per micro-batch under accumulation).
        ``losses`` must be the unscaled raw task losses (a stacked 1-D tensor or a sequence of scalars). The graph
        is freed. Returns the task weights (detached).
        """
        loss_vector = as_loss_vector(losses)
        shared = _unique_trainable(shared_params, "shared_params")
        heads = None
        if task_params is not None:
            heads = _unique_trainable(_flatten_task_params(task_params), "task_params")
            shared_ids = {id(p) for p in shared}
            if any(id(p) in shared_ids for p in heads):
                raise ValueError("a parameter appears in both shared_params and task_params")
        rows = task_gradients(losses, shared + (heads or []), retain_graph=heads is None)
        grads = rows_matrix(rows[:len(shared)], shared) if shared else \
            torch.zeros(loss_vector.numel(), 0, device=loss_vector.device)
        batch_losses = loss_vector.detach()
        if self.global_mean is not None:  # data parallel: the global batch's matrix and losses, on every rank
            grads, batch_losses = self.global_mean(grads), self.global_mean(batch_losses)
        with torch.no_grad():
            shared_grad, weights = self.combine(grads, batch_losses)
        del grads

        if heads is None:
            objective = self.combine_losses(loss_vector) if self.global_mean is None else \
                (self.head_weights(batch_losses).to(loss_vector.dtype) * loss_vector).sum()
            backward_task_specific(objective, shared, None)
        else:
            h = self.head_weights(batch_losses)
            with torch.no_grad():
                for p, per_task in zip(heads, rows[len(shared):]):
                    _add_grad(p, weighted_rows(per_task, h))
        del rows

        with torch.no_grad():
            off = 0
            for p in shared:
                n = p.numel()
                _add_grad(p, shared_grad[off:off + n].view(p.shape))
                off += n
        return weights


def _add_grad(p: Tensor, g: Tensor | None) -> None:
    """``p.grad += g`` (``p.grad = g`` when empty), in the parameter's dtype and device; None: nothing."""
    if g is None:
        return
    g = g.to(device=p.device, dtype=p.dtype)
    if p.grad is None:
        p.grad = g.clone(memory_format=torch.contiguous_format)
    else:
        p.grad.add_(g)
