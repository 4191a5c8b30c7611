"""Multi-task weighting methods (LibMTL semantics, one short module per method).

``get_weighting(name, **hparams)`` builds one of ``EW``, ``DB-MTL``, ``Aligned-MTL``, ``MoCo``, ``STCH``, ``GM-Coord``
(UMD's gradient-guided coordination, :mod:`.gm_coord`) (names are matched case-insensitively, ignoring ``-`` and
``_``). Every method has

* ``combine(grads [T x P], losses [T]) -> (shared_grad [P], task_weights [T])`` -- one optimisation step on the raw-loss
  gradients of the trainable shared parameters (the gradient methods are also pure functions: ``db_mtl``,
  ``aligned_mtl``, ``moco``);
* ``backward(losses, shared_params, task_params=None) -> task_weights`` -- the engine's replacement for
  ``loss.backward()`` (``needs_task_grads`` says whether it computes per-task gradients);
* ``combine_losses``, ``set_epoch``, ``state_dict`` / ``load_state_dict``.

Per-task gradients (the weightings' ``backward``, the diagnostics) all go through :func:`task_gradients`
(:mod:`.task_grads`: one backward per task from the task's own loss, or one batched backward).

See :mod:`endoarss_lib.weighting.base` for the conventions and each module for its paper and defaults.
"""
from __future__ import annotations

import inspect
from typing import Any

from .aligned_mtl import AlignedMTL, aligned_mtl, alignment_matrix
from .base import GradWeighting, LossWeighting, Weighting
from .db_mtl import DBMTL, db_mtl
from .ew import EW
from .gm_coord import GMCoord, gm_coord_coefficients
from .moco import MoCo, moco
from .stch import STCH
from .task_grads import task_gradients

__all__ = ["Weighting", "GradWeighting", "LossWeighting", "EW", "DBMTL", "AlignedMTL", "MoCo", "STCH", "GMCoord",
           "db_mtl", "aligned_mtl", "alignment_matrix", "moco", "gm_coord_coefficients", "WEIGHTINGS",
           "SEED_WEIGHTINGS", "get_weighting", "available_weightings", "canonical_name", "task_gradients"]

# The paper's grid (LibMTL's methods) ...
WEIGHTINGS: dict[str, type[Weighting]] = {cls.name: cls for cls in (EW, DBMTL, AlignedMTL, MoCo, STCH)}
# ... and the related papers' methods (docs/seed_components.md), selectable by the same names.
SEED_WEIGHTINGS: dict[str, type[Weighting]] = {cls.name: cls for cls in (GMCoord,)}
_ALL = {**WEIGHTINGS, **SEED_WEIGHTINGS}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_BY_KEY = {_key(n): cls for n, cls in _ALL.items()}


def available_weightings() -> list[str]:
    """Every selectable method: the paper's grid, then the related papers' (GM-Coord)."""
    return list(_ALL)


def hparam_names(name: str) -> list[str]:
    """The hyper-parameters ``get_weighting(name, ...)`` accepts."""
    cls = _lookup(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def canonical_name(name: str) -> str:
    """The one spelling of a method's name in configs, run folders and tables: lower case with ``_`` (``DB-MTL``,
    ``db-mtl``, ``dbmtl`` and ``db_mtl`` are all ``'db_mtl'``); ValueError listing the valid names otherwise."""
    return _lookup(name).name.lower().replace("-", "_")


def _lookup(name: str) -> type[Weighting]:
    if not isinstance(name, str) or _key(name) not in _BY_KEY:
        raise ValueError(f"unknown weighting method {name!r}; valid names: {', '.join(_ALL)}")
    return _BY_KEY[_key(name)]


def get_weighting(name: str, **hparams: Any) -> Weighting:
    """Build the weighting method ``name`` with its hyper-parameters (defaults from docs/training.md).

    Unknown name -> ValueError listing the valid names; unknown hyper-parameter -> TypeError naming it; invalid
    value -> ValueError naming the parameter.
    """
    cls = _lookup(name)
    valid = hparam_names(name)
    unknown = [k for k in hparams if k not in valid]
    if unknown:
        raise TypeError(f"unknown hyper-parameter(s) for {cls.name}: {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(valid) if valid else '(none)'}")
    return cls(**hparams)
