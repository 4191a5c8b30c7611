"""Result tables: CSV and Markdown written atomically, labelled with where the numbers come from."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .atomic import write_text_atomic

__all__ = ["write_table"]


def write_table(df: pd.DataFrame, path: str | os.PathLike, note: str) -> tuple[Path, Path]:
    """Write ``df`` as ``<path>.csv`` and ``<path>.md`` (with ``note`` above it, e.g. 'SYNTHETIC data')."""
    stem = Path(path).with_suffix("")
    csv = write_text_atomic(stem.with_suffix(".csv"), df.to_csv(index=False))
    md = write_text_atomic(stem.with_suffix(".md"), f"_{note}_\n\n{df.to_markdown(index=False, floatfmt='.4f')}\n")
    return csv, md
