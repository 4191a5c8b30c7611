"""Result rows and tables: rows from runs, saved atomically beside a notebook's outputs, aggregated into tables.

A *row* is the dict :func:`endoarss_lib.engine.fit` returns (dataset, synthetic or real, backbone, weights,
architecture, weighting, seed, metrics, provenance). A notebook run saves its rows as ``<out_dir>/rows.json``; the
sweep collects those files into paper-style tables.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from .atomic import write_json_atomic, write_text_atomic

__all__ = ["write_table", "save_rows", "load_rows", "rows_frame", "summarise_seeds", "ROWS_FILE", "provenance_note"]

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
    """All rows of several ``rows.json`` files (or folders holding one) as one DataFrame."""
    frames = []
    for path in paths:
        path = Path(path)
        path = path / ROWS_FILE if path.is_dir() else path
        frames.append(pd.DataFrame(json.loads(path.read_text())))
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
    """'SYNTHETIC data' / 'real data' and 'random-init backbone' labels for a table of rows; mixing is flagged."""
    kinds = sorted(set(df.get("data", pd.Series(dtype=str)).dropna()))
    parts = []
    if kinds == ["synthetic"]:
        parts.append("SYNTHETIC data (demonstrates the pipeline; reproduces nothing of the paper)")
    elif kinds == ["real"]:
        parts.append("real data")
    elif kinds:
        parts.append("MIXED synthetic and real rows: compare with care")
    if "random_init_backbone" in df and df["random_init_backbone"].fillna(False).astype(bool).any():
        parts.append("random-init backbone(s)")
    return "; ".join(parts)
