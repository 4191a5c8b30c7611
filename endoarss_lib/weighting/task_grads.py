"""Per-task gradients: the gradients of T task losses w.r.t. a list of parameters, behind one function.

:func:`task_gradients` is what every per-task gradient of the project goes through (the gradient weightings'
``backward``, GM-Coord's ``apply_to="shared"`` path and :func:`endoarss_lib.training.diagnostics.task_gradient_matrix`).
It returns, per parameter, one gradient per task (``None`` where the task's loss does not reach the parameter).
Two strategies, equal up to floating-point rounding:

* ``"loop"``: one ``torch.autograd.grad`` per task. Each backward starts from the task's **own** loss
  (:func:`loss_roots`): when the losses come as ``torch.stack([L_1, ..., L_T])`` the backward starts at ``L_t``, not
  at ``stack(...)[t]`` -- the latter would push zero gradients through every other task's branch (its head),
  i.e. a full backward per task.
* ``"batched"``: one ``torch.autograd.grad(..., is_grads_batched=True)`` with the identity as ``grad_outputs`` (a
  vmap over the backward). Every op of the backward then runs once on T stacked gradients, the branches of all
  tasks included (a task's rows are zero in the other tasks' branches, but computed). Some ops have no batching
  rule: the first failure (an error, or PyTorch's slow per-row fallback announced by a performance warning) is
  reported once with its reason and remembered for that parameter set, which then uses the loop.

``"auto"`` (the default, see :data:`DEFAULT_MODE`) picks the loop: on CPU it was measured faster than the batched
backward on every model of ``benchmarks/bench_weighting.py`` (the vmapped backward does the same arithmetic plus the
other tasks' branches, and CPU kernels are compute-bound, so batching saves only per-call overhead). Choose
``"batched"`` explicitly (argument, :func:`set_default_mode` or ``ENDOARSS_TASK_GRADS=batched``) where it pays, e.g.
small models on a GPU, where one launch per op instead of T matters. The choice is deterministic (never timed at
run time), so bitwise resume is unaffected.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["task_gradients", "loss_roots", "rows_matrix", "weighted_rows", "set_default_mode", "get_default_mode",
           "batching_failure", "MODES", "DEFAULT_MODE"]

MODES = ("auto", "loop", "batched")
DEFAULT_MODE = "auto"
_mode = os.environ.get("ENDOARSS_TASK_GRADS", DEFAULT_MODE)
# Parameter sets, keyed on their first tensor (by identity): batched backward failed -> the reason / worked once.
_FAILED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PROVEN: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PERF_WARNING = "There is a performance drop because we have not yet implemented the batching rule"

Root = "Tensor | GradientEdge | None"
Rows = "list[tuple[Tensor | None, ...]]"


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"task-gradient mode must be one of {MODES}, got {mode!r}")
    return mode


def set_default_mode(mode: str) -> None:
    """Process-wide strategy of :func:`task_gradients` when called without ``mode`` (``"auto"`` = the loop)."""
    global _mode
    _mode = _check_mode(mode)


def get_default_mode() -> str:
    """The current process-wide strategy (``ENDOARSS_TASK_GRADS`` or :func:`set_default_mode`; ``"auto"``)."""
    return _check_mode(_mode)


def batching_failure(params: Sequence[Tensor]) -> str | None:
    """Why the batched backward was given up for this parameter set (None: never failed)."""
    return _FAILED.get(params[0]) if params else None


# ---------------------------------------------------------------------------------------------------------------
# Where each task's backward starts
# ---------------------------------------------------------------------------------------------------------------

def _stack_inputs(vector: Tensor) -> list[Root] | None:
    """The T scalar inputs of ``vector = torch.stack([L_1, ..., L_T])`` as gradient edges, else None."""
    node = vector.grad_fn
    if node is None or vector.dim() != 1 or type(node).__name__ != "StackBackward0":
        return None
    inputs = node.next_functions
    if len(inputs) != vector.numel():  # T inputs giving T elements: every input was a scalar
        return None
    return [None if fn is None else GradientEdge(fn, nr) for fn, nr in inputs]


def _select_of_stack(loss: Tensor) -> Root:
    """``torch.stack(...)[t]`` (a select of a stack) -> the stack's t-th input edge; otherwise ``loss`` itself."""
    node = loss.grad_fn
    if loss.dim() != 0 or node is None or type(node).__name__ != "SelectBackward0":
        return loss
    parent = node.next_functions[0][0]
    if parent is None or type(parent).__name__ != "StackBackward0":
        return loss
    inputs = parent.next_functions
    try:  # autograd node attributes (not a stable API): anything unexpected -> the select itself
        dim, index, sizes = node._saved_dim, node._saved_index, tuple(node._saved_self_sym_sizes)
    except (AttributeError, RuntimeError):
        return loss
    if dim != 0 or sizes != (len(inputs),) or not -len(inputs) <= index < len(inputs):
        return loss
    fn, nr = inputs[index]
    return None if fn is None else GradientEdge(fn, nr)


def loss_roots(losses: Tensor | Sequence[Tensor]) -> list[Root]:
    """Where each task's backward starts: its own loss (``None``: a constant loss, zero gradient).

    ``losses`` is a 1-D tensor of T losses or a sequence of T scalar tensors. A stacked vector (or selects of one)
    is traced back to the stacked scalars, so task t's backward only visits the graph ``L_t`` depends on; any other
    1-D tensor is indexed (correct, but each task's backward then also runs through the other tasks' branches).
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses must be a 1-D tensor of T task losses, got shape {tuple(losses.shape)}")
        if not losses.requires_grad:
            return [None] * losses.numel()
        roots = _stack_inputs(losses)
        return roots if roots is not None else [losses[t] for t in range(losses.numel())]
    roots: list[Root] = []
    for i, l in enumerate(losses):
        if not isinstance(l, Tensor):
            roots.append(None)  # a plain number: a constant loss
            continue
        if l.numel() != 1:
            raise ValueError(f"losses[{i}] must be a scalar, got shape {tuple(l.shape)}")
        roots.append(_select_of_stack(l.reshape(())) if l.requires_grad else None)
    if not roots:
        raise ValueError("losses must hold at least one task loss")
    return roots


# ---------------------------------------------------------------------------------------------------------------
# The two strategies
# ---------------------------------------------------------------------------------------------------------------

def _grad_output(root: Root, like: Tensor | None = None) -> Tensor:
    """The seed gradient 1 of a scalar root (a tensor or a gradient edge), on its device and dtype."""
    if isinstance(root, Tensor):
        return torch.ones_like(root)
    try:
        meta = root.node._input_metadata[root.output_nr]
        return torch.ones(tuple(meta.shape), dtype=meta.dtype, device=meta.device)
    except (AttributeError, IndexError, TypeError):
        pass
    return torch.ones((), dtype=like.dtype if like is not None else torch.float32,
                      device=like.device if like is not None else None)


def _loop(roots: list[Root], params: list[Tensor], retain_graph: bool) -> Rows:
    t_num, live = len(roots), [t for t, r in enumerate(roots) if r is not None]
    per_task: list[tuple[Tensor | None, ...]] = [(None,) * len(params)] * t_num
    for i, t in enumerate(live):
        keep = retain_graph or i + 1 < len(live)
        per_task[t] = torch.autograd.grad([roots[t]], params, grad_outputs=[_grad_output(roots[t], params[0])],
                                          retain_graph=keep, allow_unused=True)
    return [tuple(per_task[t][j] for t in range(t_num)) for j in range(len(params))]


def _batched(roots: list[Root], params: list[Tensor], retain_graph: bool) -> Rows:
    t_num, live = len(roots), [t for t, r in enumerate(roots) if r is not None]
    seeds = []
    for t in live:
        one = _grad_output(roots[t], params[0])
        seed = torch.zeros((t_num, *one.shape), dtype=one.dtype, device=one.device)
        seed[t] = one
        seeds.append(seed)
    grads = torch.autograd.grad([roots[t] for t in live], params, grad_outputs=seeds, retain_graph=retain_graph,
                                allow_unused=True, is_grads_batched=True)
    return [(None,) * t_num if g is None else tuple(g.unbind(0)) for g in grads]


def _try_batched(roots: list[Root], params: list[Tensor], retain_graph: bool) -> tuple[Rows | None, str]:
    """``(rows, "")`` from the batched backward, or ``(None, reason)`` where it failed (the graph is kept so the
    caller can run the loop, which tells a batching failure from an error of the graph itself)."""
    proven = params[0] in _PROVEN
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Until the batched backward has worked once, keep the graph so the loop can still run after a failure.
            rows = _batched(roots, params, retain_graph or not proven)
    except RuntimeError as err:
        if proven and not retain_graph:
            raise RuntimeError("per-task gradients: the batched backward failed on a parameter set it had worked "
                               "for, after freeing part of the graph; use mode='loop' for this model") from err
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    slow = [str(w.message) for w in caught if _PERF_WARNING in str(w.message)]
    for w in caught:  # the backward's own warnings, passed on (under the usual once-per-location filters)
        if _PERF_WARNING not in str(w.message):
            warnings.warn(w.message, stacklevel=3)
    if slow:  # correct, but PyTorch looped over the rows itself: use the plain loop from now on
        _give_up(params, "an op of the backward has no batching rule (PyTorch's slow fallback): " + slow[0])
    else:
        _PROVEN[params[0]] = True
    return rows, ""


def _give_up(params: list[Tensor], reason: str) -> None:
    _FAILED[params[0]] = reason
    warnings.warn(f"per-task gradients: the batched backward (is_grads_batched) cannot be used for this model, "
                  f"falling back to one backward per task from now on. Reason: {reason}", RuntimeWarning,
                  stacklevel=3)


def task_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor], *, mode: str | None = None,
                   retain_graph: bool = False) -> Rows:
    """Gradients of every task loss w.r.t. ``params``: ``rows[j][t] = dL_t / dparams[j]`` (None: not reached).

    ``losses``: a 1-D tensor of T losses or a sequence of T scalars (see :func:`loss_roots`); ``params``: tensors
    that require grad (frozen ones are the caller's business: pass only trainable ones). ``mode``: ``"loop"``,
    ``"batched"`` or ``"auto"`` / None (the process default, :func:`get_default_mode`); see the module docstring.
    ``retain_graph=False`` frees the graph after the last backward. Nothing is accumulated into ``.grad``.
    """
    mode = _check_mode(get_default_mode() if mode is None else mode)
    params = list(params)
    roots = loss_roots(losses)
    if not params:
        return []
    live = [r for r in roots if r is not None]
    if not live:
        return [(None,) * len(roots) for _ in params]
    if mode == "batched" and len(live) > 1 and params[0] not in _FAILED:
        rows, reason = _try_batched(roots, params, retain_graph)
        if rows is not None:
            return rows
        rows = _loop(roots, params, retain_graph)  # raises if the graph itself is at fault
        _give_up(params, reason)
        return rows
    return _loop(roots, params, retain_graph)


# ---------------------------------------------------------------------------------------------------------------
# Using the rows
# ---------------------------------------------------------------------------------------------------------------

def rows_matrix(rows: Rows, params: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """The (T x P) matrix of flattened per-task gradients (missing rows -> zeros), in ``dtype`` (default: the
    parameters' dtype, float64 if any is float64 else float32)."""
    params = list(params)
    if dtype is None:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    sizes = [p.numel() for p in params]
    t_num = len(rows[0]) if rows else 0
    device = params[0].device if params else None
    out = torch.zeros(t_num, sum(sizes), dtype=dtype, device=device)
    off = 0
    for n, per_task in zip(sizes, rows):
        for t, g in enumerate(per_task):
            if g is not None:
                out[t, off:off + n].copy_(g.reshape(-1))
        off += n
    return out


def weighted_rows(per_task: tuple[Tensor | None, ...], weights: Tensor) -> Tensor | None:
    """``sum_t weights[t] * per_task[t]`` over the tasks that reach the parameter (None if none does)."""
    out = None
    for w, g in zip(weights, per_task):
        if g is None:
            continue
        term = g * w.to(device=g.device, dtype=g.dtype)
        out = term if out is None else out.add_(term)
    return out
