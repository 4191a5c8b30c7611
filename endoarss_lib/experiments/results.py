"""Result tables: rows saved atomically beside a notebook's outputs, aggregated into tables, summarised over seeds,
read for degenerate models, Delta_m against single-task baselines, and compared in words.

A *row* has the one schema of :mod:`endoarss_lib.training.rows` (:class:`ResultRow`, :func:`read_row`; re-exported
here): training (:func:`endoarss_lib.training.engine.fit`), evaluation (:mod:`endoarss_lib.evaluation.inference`),
robustness cells (:mod:`endoarss_lib.robustness.evaluation`) and the released model's evaluation
(:mod:`endoarss_lib.evaluate`) all write it (``source`` says which). A notebook run saves its rows as
``<out_dir>/rows.json``; the sweep collects those files into tables.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..atomic import write_json_atomic, write_text_atomic
from ..data import get_spec
from ..evidence.outcomes import outcome_value
from ..evidence.variants import FEATURED
from ..metrics import delta_m
from ..tasks import DEFAULT_TASKS, TASKS, delta_m_keys, get_task, higher_is_better, split_key
from ..training.engine import RunError, read_per_image
from ..training.rows import ROW_FIELDS, ROW_SOURCES, SCHEMA_VERSION, ResultRow, Row, RowKeyError, read_row

__all__ = ["write_table", "save_rows", "load_rows", "rows_frame", "summarise_seeds", "ROWS_FILE", "provenance_note",
           "degenerate", "caption", "beats_prior", "assert_learns", "delta_m_against_single", "compare",
           "read_run_logs", "ResultRow", "Row", "RowKeyError", "read_row", "ROW_FIELDS", "SCHEMA_VERSION",
           "ROW_SOURCES"]

ROWS_FILE = "rows.json"


def write_table(df: pd.DataFrame, path: str | os.PathLike, note: str) -> tuple[Path, Path]:
    """Write ``df`` as ``<path>.csv`` and ``<path>.md`` (with ``note`` above it, e.g. 'SYNTHETIC data')."""
    stem = Path(path).with_suffix("")
    csv = write_text_atomic(stem.with_suffix(".csv"), df.to_csv(index=False))
    md = write_text_atomic(stem.with_suffix(".md"), f"_{note}_\n\n{df.to_markdown(index=False, floatfmt='.4f')}\n")
    return csv, md


def save_rows(rows: Sequence[dict], out_dir: str | os.PathLike, experiment: str) -> Path:
    """Save a notebook run's result rows (tagged with the experiment name) as ``<out_dir>/rows.json``."""
    tagged = [{"experiment": experiment, **row} for row in rows]
    return write_json_atomic(Path(out_dir) / ROWS_FILE, tagged)


def load_rows(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All rows of several ``rows.json`` files (or folders holding one) as one DataFrame (:func:`read_row`: the
    schema fields an older row lacks are None)."""
    frames = []
    for path in paths:
        path = Path(path)
        path = path / ROWS_FILE if path.is_dir() else path
        frames.append(pd.DataFrame([read_row(r) for r in json.loads(path.read_text())]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def rows_frame(rows: Sequence[dict], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows as a DataFrame, optionally restricted to ``columns`` (missing ones become NaN)."""
    df = pd.DataFrame(list(rows))
    return df.reindex(columns=list(columns)) if columns is not None else df


def summarise_seeds(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each metric per configuration (``<metric>`` and ``<metric>_std``)."""
    grouped = df.groupby(list(by), sort=False, dropna=False)
    mean = grouped[list(metrics)].mean()
    std = grouped[list(metrics)].std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out.insert(0, "seeds", grouped.size())
    return out.reset_index()


def provenance_note(df: pd.DataFrame) -> str:
    """'SYNTHETIC data' / 'real data', and the backbones' provenance ('synthetic-pretrained backbone', 'random-init
    backbone') for a table of rows; mixing synthetic and real rows is flagged."""
    kinds = sorted(set(df.get("data", pd.Series(dtype=str)).dropna()))
    parts = []
    if kinds == ["synthetic"]:
        parts.append("SYNTHETIC data (demonstrates the pipeline; reproduces nothing of the paper)")
    elif kinds == ["real"]:
        parts.append("real data")
    elif kinds:
        parts.append("MIXED synthetic and real rows: compare with care")
    if "synthetic_pretrained_backbone" in df and _flag(df["synthetic_pretrained_backbone"]).any():
        parts.append("synthetic-pretrained backbone (the project's stand-in for DINOv2, not DINOv2)")
    if "random_init_backbone" in df and _flag(df["random_init_backbone"]).any():
        parts.append("random-init backbone(s)")
    return "; ".join(parts)


def _flag(series: pd.Series) -> pd.Series:
    return series.astype("boolean").fillna(False).astype(bool)


# ------------------------------------------------------------------------------------------------ degenerate models

def degenerate(df: pd.DataFrame, metric_prefix: str = "test_") -> list[str]:
    """Messages for rows whose model is degenerate, as a reader must be told beside the table: for every registered
    task, the first of its ``degenerate`` rules that holds (:mod:`endoarss_lib.tasks`), e.g.

    * a constant activity prediction (one class predicted for every test image);
    * activity accuracy at or below the majority class's share (what always answering that class scores);
    * an all-background segmentation (no foreground pixel predicted);

    and identical results across rows that are different configurations (every test metric equal).
    """
    p = metric_prefix
    msgs = []
    names = df["name"] if "name" in df else df.get("model_label", pd.Series(range(len(df)), index=df.index))
    for i, row in df.iterrows():
        label = str(names[i])
        for task in list(TASKS.values()):
            message = task.degeneracy(lambda metric: row.get(f"{p}{task.name}_{metric}"))
            if message:
                msgs.append(f"{label}: {message}")
    metrics = [c for c in df if c.startswith(p) and pd.api.types.is_numeric_dtype(df[c])]
    if metrics and "config_hash" in df and len(df) > 1:
        filled = df[metrics].round(12).fillna(-1.0)
        dup = filled.duplicated(keep=False) & ~df["config_hash"].duplicated(keep=False)
        for _, group in df[dup].groupby(filled[dup].apply(tuple, axis=1).values, sort=False):
            msgs.append(f"identical test results for different configurations: {', '.join(map(str, names[group.index]))}")
    return msgs


def caption(df: pd.DataFrame, extra: str = "") -> str:
    """A table's caption: :func:`provenance_note`, ``extra``, and a DEGENERATE line listing :func:`degenerate`."""
    parts = [x for x in (provenance_note(df), extra) if x]
    bad = degenerate(df)
    if bad:
        parts.append("DEGENERATE: " + "; ".join(bad))
    return "; ".join(parts)


def beats_prior(row: Mapping, prefix: str = "test_") -> dict[str, bool]:
    """Whether a row's model beats the prior predictor on each task it was tested on (the task's ``prior`` check:
    activity accuracy above the majority class's share, what always answering the most frequent class scores;
    foreground mIoU above 0, what predicting background everywhere scores)."""
    return {task.name: task.beats_prior(lambda metric, t=task.name: row.get(f"{prefix}{t}_{metric}"))
            for task in list(TASKS.values()) if f"{prefix}{task.name}_{task.prior.metric}" in row}


def assert_learns(row: Mapping, what: str = "the featured model", tasks: Iterable[str] | None = None) -> None:
    """Raise AssertionError naming the task when ``row`` does not beat the prior predictor (:func:`beats_prior`) on
    each of ``tasks`` (default: every task the row trains; a named task the row does not train is an error).
    Notebooks call it on their default parameters, so their tests fail when a default run is degenerate."""
    verdicts = beats_prior(row)
    if tasks is not None:
        tasks = list(tasks)
        missing = [t for t in tasks if t not in verdicts]
        if missing:
            raise ValueError(f"{what}: no test metrics of the task(s) {missing} to check (it has {sorted(verdicts)})")
        verdicts = {t: verdicts[t] for t in tasks}
    failed = [t for t, ok in verdicts.items() if not ok]
    if failed:
        detail = {t: {k: row.get(k) for k in (f"test_{t}_{m}" for m in get_task(t).prior.keys()) if k in row}
                  for t in failed}
        raise AssertionError(f"{what} does not beat the prior predictor on {failed}: {detail}. With these "
                             "parameters the model learns too little: train longer or on more data, or set "
                             "assert_learning=False to render the tables anyway")


# ------------------------------------------------------------------------------------------------ multi-task gain

def delta_m_against_single(rows: pd.DataFrame, metrics: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """Delta_m (LibMTL's per-task mean, :func:`endoarss_lib.metrics.delta_m`) of every multi-task row against the
    single-task rows of the same backbone, SMA flag, pretrained weights and seed.

    Each metric ``test_<task>_*`` is compared with the ``<task>``-only run (``arch`` single, ``tasks`` <task>);
    the metrics are those the task registry marks for Delta_m (:func:`endoarss_lib.tasks.delta_m_keys`, of the
    paper's two tasks and of any other task with test columns in ``rows``) unless ``metrics`` names them. A row uses
    the metrics of the tasks it trains (its ``tasks`` column); those not finite in the row and its baseline are left
    out (``delta_m_metrics`` names those used). NaN where a baseline is missing.
    """
    if metrics is None:
        present = [t for t in TASKS if t in DEFAULT_TASKS or any(c.startswith(f"test_{t}_") for c in rows)]
        metrics = delta_m_keys(present)
    metrics = dict(metrics)
    values, used = [], []
    key = [k for k in ("backbone", "sma", "pretrained", "seed") if k in rows]
    singles = rows[rows["arch"] == "single"]
    task_of = {k: split_key(k, registered=False)[1] for k in metrics}
    for _, row in rows.iterrows():
        match = singles[(singles[key] == row[key]).all(axis=1)] if key else singles
        trained = set(str(row["tasks"]).split("+")) if "tasks" in row and isinstance(row["tasks"], str) else None
        keys = [k for k in metrics if trained is None or task_of[k] in trained]
        bases = {t: match[match["tasks"] == t] for t in dict.fromkeys(task_of[k] for k in keys)}
        if row["arch"] == "single" or not bases or any(b.empty for b in bases.values()):
            values.append(np.nan)
            used.append("")
            continue
        single = {k: bases[task_of[k]].iloc[0].get(k, np.nan) for k in keys}
        finite = [k for k in keys if np.isfinite(row.get(k, np.nan)) and np.isfinite(single[k]) and single[k] != 0]
        values.append(delta_m({k: row[k] for k in finite}, {k: single[k] for k in finite},
                              {k: metrics[k] for k in finite}) if finite else np.nan)
        used.append(",".join(k.replace("test_", "") for k in finite))
    return pd.DataFrame({"delta_m": values, "delta_m_metrics": used}, index=rows.index)


# ------------------------------------------------------------------------------------------------ reading the numbers

def compare(rows: pd.DataFrame, by: str, a, b, metric: str, seed: str = "seed") -> str:
    """One sentence comparing configuration ``a`` with ``b`` (values of column ``by``) on ``metric``, written from the
    numbers: which is ahead and by how much (mean over seeds), and whether that is more than the seed-to-seed spread.

    With seeds on both sides the difference is judged against the standard deviation of the paired per-seed
    differences (or of the two groups when seeds do not pair): "within noise" when ``|mean difference|`` is below
    it. With one seed the sentence says that noise cannot be judged. The metric's direction comes from the task
    registry (for HD a lower value is ahead).
    """
    try:
        higher = higher_is_better(metric)
    except KeyError:
        higher = True
    label = metric.replace("test_", "")
    va = rows.loc[rows[by] == a].set_index(seed)[metric] if seed in rows else rows.loc[rows[by] == a, metric]
    vb = rows.loc[rows[by] == b].set_index(seed)[metric] if seed in rows else rows.loc[rows[by] == b, metric]
    va, vb = va.dropna(), vb.dropna()
    if va.empty or vb.empty:
        return f"{label}: no values for {a if va.empty else b}."
    diff = float(va.mean() - vb.mean())
    if abs(diff) <= 1e-12 * max(1.0, abs(float(va.mean()))):  # equal up to the rounding of the means
        diff = 0.0
    ahead, behind = (a, b) if (diff > 0) == higher else (b, a)
    n = min(len(va), len(vb))
    if diff == 0:
        text = f"{a} and {b} have the same {label} ({va.mean():.3f})"
    else:
        first, second = (va.mean(), vb.mean()) if ahead == a else (vb.mean(), va.mean())
        text = f"{ahead} is ahead of {behind} on {label}: {first:.3f} vs {second:.3f} (by {abs(diff):.3f})"
    if n < 2:
        return text + "; one seed, so the seed-to-seed noise cannot be judged."
    common = va.index.intersection(vb.index)
    if len(common) >= 2:
        spread = float(np.std((va[common] - vb[common]).to_numpy(), ddof=1))
        kind = "paired per-seed differences"
    else:
        spread = float(max(va.std(ddof=1), vb.std(ddof=1)))
        kind = "per-configuration seed std"
    verdict = "within noise" if abs(diff) <= spread else "more than the noise"
    return f"{text}; {verdict} (std of the {kind} over {n} seeds: {spread:.3f})."


def read_run_logs(rows: pd.DataFrame, name: str = "log.csv", columns: Sequence[str] = ("name", "seed")
                  ) -> pd.DataFrame:
    """One of the run folders' CSV logs (``log.csv``, ``diagnostics.csv``, ``routing.csv``) for every result row,
    concatenated, with the rows' ``columns`` in front (runs without that file are skipped)."""
    frames = []
    for _, row in rows.iterrows():
        path = Path(row["run_dir"]) / name
        if path.is_file():
            frame = pd.read_csv(path)
            for position, column in enumerate(c for c in columns if c in row):
                frame.insert(position, column, row[column])
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def demonstration_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run for ``results/tables/demonstration.csv``: its configuration name (``variant``), seed, whether it
    is the featured configuration, the test metrics, and the test IoU of every segmentation class by name
    (``test_seg_iou_<class>``, from the run's per-image outcomes)."""
    out = []
    for row in rows:
        record = {"variant": row.get("variant", row.get("name")), "seed": row.get("seed"),
                  "featured": row.get("variant") == FEATURED, "dataset": row.get("dataset"),
                  "run": Path(str(row["run_dir"])).name}
        record.update({k: v for k, v in row.items() if k.startswith("test_") and not isinstance(v, (dict, list))})
        try:
            arrays = read_per_image(row["run_dir"])
        except RunError:
            arrays = {}
        if "seg_confusion" in arrays:
            names = get_spec(row["dataset"]).seg_classes
            record.update({f"test_seg_iou_{n}": outcome_value(arrays, f"seg_iou_{n}", class_names=names)
                           for n in names})
        out.append(record)
    return pd.DataFrame(out)
