"""Live curves: the TensorBoard log of a run (``TrainConfig.tensorboard = true``).

The engine writes, from rank 0, to ``<run folder>/tensorboard/`` (``make tensorboard`` or
``tensorboard --logdir results/runs`` shows every run of ``results/runs`` side by side):

* every optimisation step (x = the run's global step): ``train/loss_<task>`` (the raw task losses),
  ``train/weight_<task>`` (the task weights the weighting method returned: DB-MTL's alpha, STCH's d loss / d L_t,
  EW's ones, ...) and, on the steps where task-gradient diagnostics run (``diagnostics_every``), ``conflict/<key>``
  (the cosine between the tasks' gradients, their magnitude similarity, ...; the per-block values are in
  ``diagnostics.csv``);
* every epoch (x = the epoch): every column of ``log.csv`` as ``epoch/<column>`` and the selection split's metrics
  again as ``val/<metric>`` (``test/<metric>`` with ``select_on=test``);
* once, after the selected epoch's test evaluation: ``test/<metric>``.

``SummaryWriter`` comes from ``torch.utils.tensorboard``, which needs the ``tensorboard`` package (an optional
dependency: ``pip install tensorboard`` or ``pip install 'endoarss[tensorboard]'``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from ..coerce import ConfigError

__all__ = ["TensorBoardLog", "require_tensorboard", "TB_FOLDER"]

TB_FOLDER = "tensorboard"
_INSTALL = "pip install tensorboard (or pip install 'endoarss[tensorboard]')"


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``; a ConfigError naming the field and the install command when the
    tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"tensorboard=true: the tensorboard package is not installed: {_INSTALL}; or set "
                          f"tensorboard=false") from None
    return SummaryWriter


def _number(value) -> float | None:
    """A loggable float, or None (text, None, NaN / inf are left out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / 0-d torch values
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


class TensorBoardLog:
    """A run's TensorBoard writer (see the module docstring for the tags)."""

    def __init__(self, run_folder: str | Path, tasks: Sequence[str], flush_secs: int = 10):
        writer = require_tensorboard()
        self.folder = Path(run_folder) / TB_FOLDER
        self.tasks = list(tasks)
        self.writer = writer(log_dir=str(self.folder), flush_secs=flush_secs)

    def _scalars(self, prefix: str, values: Mapping, step: int) -> None:
        for key, value in values.items():
            number = _number(value)
            if number is not None:
                self.writer.add_scalar(f"{prefix}/{key}", number, step)

    def step(self, global_step: int, result: Mapping) -> None:
        """One optimisation step: :func:`~endoarss_lib.training.engine.train_step`'s losses, task weights,
        diagnostics."""
        self._scalars("train", {f"loss_{t}": v for t, v in result["losses"].items()}, global_step)
        weights = result.get("weights")
        if weights is not None:
            values = weights.detach().flatten().tolist() if hasattr(weights, "detach") else list(weights)
            self._scalars("train", {f"weight_{t}": w for t, w in zip(self.tasks, values)}, global_step)
        record = result.get("diagnostics")
        if record:
            self._scalars("conflict", {k: v for k, v in record.items() if "/" not in k}, global_step)

    def epoch(self, row: Mapping, select_split: str = "val") -> None:
        """One epoch's ``log.csv`` row (its ``epoch`` column is the x)."""
        step = int(row["epoch"])
        self._scalars("epoch", {k: v for k, v in row.items() if k != "epoch"}, step)
        prefix = f"{select_split}_"
        self._scalars(select_split, {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}, step)
        self.writer.flush()

    def test(self, metrics: Mapping, epoch: int) -> None:
        """The selected model's test metrics (x = the selected epoch)."""
        self._scalars("test", metrics, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
