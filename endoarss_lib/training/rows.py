"""The one result-row schema: every run (:func:`endoarss_lib.training.engine.fit`), evaluation
(:mod:`endoarss_lib.evaluation.inference`), robustness cell (:mod:`endoarss_lib.robustness.evaluation`) and the
released model's evaluation (:mod:`endoarss_lib.evaluate`) writes a :class:`ResultRow` (``source`` says which).

A *row* is a flat dict with the fields of :class:`ResultRow` (``schema_version`` first): what was evaluated
(dataset, synthetic or real, tasks, backbone, weights, architecture, weighting, seed), its metrics (``test_*``,
``val_*``), cost, and provenance (library version, git commit and dirty flag, Python, platform, torch, CUDA, cuDNN,
GPU, the deterministic switch). :func:`read_row` reads any row back, an older one included: fields it lacks are
None and listed in ``row.missing``, and asking it for a key it does not hold says what it holds instead of a bare
KeyError. The tables built from rows are in :mod:`endoarss_lib.experiments.results` (which re-exports these names).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..tasks import split_key
from ..version import provenance

__all__ = ["ResultRow", "Row", "RowKeyError", "read_row", "ROW_FIELDS", "SCHEMA_VERSION", "ROW_SOURCES"]

SCHEMA_VERSION = 1  # 1: the first versioned schema (provenance, source; older rows have no schema_version)
ROW_SOURCES = ("train", "evaluate", "robustness", "released", "prior")


@dataclass
class ResultRow:
    """The one schema of result rows (every writer fills it; :meth:`to_dict` flattens it to the stored dict).

    ``source``: ``train`` (fit), ``evaluate`` (a run evaluated again, e.g. on a shifted set), ``robustness`` (one
    corruption cell), ``released`` (the authors' checkpoint), ``prior`` (the prior predictor). ``metrics``: result
    keys (``test_<task>_<metric>``, ``val_...``; a robustness cell's keys have no split) flattened into the row;
    ``extra``: the source's own keys (a robustness cell's corruption and severity, the released checkpoint's file),
    flattened too. Fields that do not apply to a source are None. ``seed``: the seed of the row's randomness (the
    training seed; for a robustness cell the corruption seed). Provenance (``library_version`` ... ``gpu_name``):
    :func:`endoarss_lib.version.provenance`; ``git_dirty`` is None outside a git checkout.
    """

    source: str
    dataset: str | None = None
    data: str | None = None  # "synthetic" | "real"
    backbone: str | None = None
    arch: str | None = None
    sma: bool | None = None
    weighting: str | None = None
    tasks: str | None = None  # "cls+seg"
    connector: str | None = None
    cls_loss: str | None = None
    model_label: str | None = None
    paper_backbone: str | None = None
    pretrained: str | None = None
    pretrained_name: str | None = None
    weights_sha256: str | None = None
    random_init_backbone: bool | None = None
    synthetic_pretrained_backbone: bool | None = None
    seed: int | None = None
    preset: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    epochs_trained: int | None = None  # fewer than ``epochs`` when early stopping (``patience``) stopped the run
    patience: int | None = None
    select_on: str | None = None
    compat_eval_size: int | None = None
    metrics: dict = field(default_factory=dict)
    params_total: int | None = None
    params_trainable: int | None = None
    wall_time_s: float | None = None
    device: str | None = None
    peak_memory_mib: float | None = None
    peak_memory_kind: str | None = None
    deterministic: bool | None = None
    library_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    python_version: str | None = None
    platform: str | None = None
    torch_version: str | None = None
    cuda_version: str | None = None
    cudnn_version: int | None = None
    gpu_name: str | None = None
    config_hash: str | None = None
    data_fingerprint: dict | None = None
    run_dir: str | None = None
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.source not in ROW_SOURCES:
            raise ValueError(f"source={self.source!r}: expected one of {ROW_SOURCES}")
        clash = sorted((set(self.metrics) | set(self.extra)) & set(ROW_FIELDS) | set(self.metrics) & set(self.extra))
        if clash:
            raise ValueError(f"result row: keys {clash} appear twice (schema fields, metrics and extra keys must differ)")

    @classmethod
    def with_provenance(cls, device=None, **fields) -> "ResultRow":
        """A row whose provenance fields are this process's (:func:`endoarss_lib.version.provenance` on
        ``device``); ``device`` is also recorded."""
        return cls(**{**provenance(device), "device": None if device is None else str(device), **fields})

    def to_dict(self) -> "Row":
        """The stored form: ``schema_version`` and ``source`` first, then the fields in order, ``metrics`` and
        ``extra`` flattened in place."""
        out = Row({"schema_version": self.schema_version, "source": self.source})
        for f in dataclasses.fields(self):
            if f.name in ("schema_version", "source"):
                continue
            value = getattr(self, f.name)
            if f.name in ("metrics", "extra"):
                out.update(value)
            else:
                out[f.name] = value
        return out


ROW_FIELDS = ("schema_version", "source") + tuple(
    f.name for f in dataclasses.fields(ResultRow) if f.name not in ("metrics", "extra", "schema_version", "source"))


class RowKeyError(KeyError):
    """A key a result row does not hold (the message says what the row holds and which schema fields it lacks)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Row(dict):
    """A result row: a plain dict (JSON, DataFrames, ``==`` with dicts) whose ``missing`` lists the schema fields the
    stored row lacked (an older row: they read None); a key it does not hold raises :class:`RowKeyError` saying
    why, not a bare KeyError."""

    def __init__(self, *args, missing: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.missing = tuple(missing)

    def __missing__(self, key):
        version = dict.get(self, "schema_version")
        parts = [f"this result row has no {key!r}"]
        if self.missing:
            parts.append(f"it was written with schema version {version or 0} (before {SCHEMA_VERSION}) and lacks "
                         f"{list(self.missing)}")
        if isinstance(key, str) and key.startswith(("test_", "val_")):
            try:
                task = split_key(key, registered=False)[1]
            except KeyError:
                task = None
            tasks = str(dict.get(self, "tasks") or "")
            if task is not None and tasks and task not in tasks.split("+"):
                parts.append(f"its model was trained on {tasks}, not {task!r}")
            else:
                held = sorted(k for k in self if isinstance(k, str) and k.startswith(key.split("_", 1)[0] + "_"))
                parts.append(f"its {key.split('_', 1)[0]} metrics: {held[:12]}{' ...' if len(held) > 12 else ''}")
        raise RowKeyError("; ".join(parts))


def read_row(data: Mapping) -> Row:
    """A stored row as a :class:`Row`: every schema field present (those an older row lacks are None, listed in
    ``row.missing``; ``schema_version`` 0 marks a row written before the schema)."""
    missing = tuple(f for f in ROW_FIELDS if f not in data)
    row = Row(data, missing=missing)
    for name in missing:
        row[name] = 0 if name == "schema_version" else None
    return row
