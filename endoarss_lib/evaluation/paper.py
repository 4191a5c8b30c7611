"""The paper's tables as data (``endoarss_lib/evaluation/paper_tables/*.csv``, shipped with the package) and our result
rows set beside them.

Each table is a tidy CSV in our vocabulary: ``dataset`` (mtlesd | mtlendovis | mtlendovis_gen), ``backbone``
(resnet101 | dinov2 | endoarss = DINOv2 + SMA), ``arch`` (mmoe | dselect_k | tesla | single), ``weighting``
(moco | aligned_mtl | stch | db_mtl | none), ``task`` (both | cls | seg), then the paper's metric columns in the
paper's units (``AC, F_score, mIoU, DS, SSIM`` in %, ``HD`` in the released code's units). Those columns are what the
authors' evaluation computes, i.e. our ``compat_`` metrics (see :data:`PAPER_TO_OURS`); ``paper_tables/README.md``
(beside the CSVs) records the transcription choices and the paper's inconsistencies.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from ..tasks import DEFAULT_TASKS, paper_columns

__all__ = ["PAPER_TABLES", "PAPER_METRICS", "PAPER_TO_OURS", "PaperMetric", "paper_dir", "load_paper_table", "compact",
           "paper_table_for", "ablation_variants", "to_paper_vocabulary", "side_by_side", "DEFAULT_KEYS", "MAIN_TABLES"]

PAPER_TABLES: dict[str, str] = {
    "table1": "Table I: datasets (activity / segmentation classes, train / test / total images)",
    "table2": "Table II: backbone x architecture x weighting on MTLESD (AC, F-score, mIoU, DS, HD, SSIM)",
    "table3": "Table III: backbone x architecture x weighting on MTLEndovis",
    "table4": "Table IV: generalisation: trained on MTLEndovis, tested on MTLEndovis-Gen",
    "table5": "Table V: ablation of DINOv2 / TESLA / SMA on MTLESD and MTLEndovis (with the per-class +- spread)",
    "table6": "Table VI: TESLA rank 1 / 4 / 8 / 16 on MTLESD and MTLEndovis",
    "table7": "Table VII: robustness on MTLESD: AC and mIoU per corruption (19 types, mean of 5 severities) and mean",
}
_FILES = {"table1": "table1_datasets.csv", "table2": "table2_mtlesd.csv", "table3": "table3_mtlendovis.csv",
          "table4": "table4_mtlendovis_gen.csv", "table5": "table5_ablation.csv", "table6": "table6_rank.csv",
          "table7": "table7_robustness.csv"}
MAIN_TABLES = {"mtlesd": "table2", "mtlendovis": "table3", "mtlendovis_gen": "table4"}
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7}
_BOOL_COLUMNS = ("DINOv2", "TESLA", "SMA")

PAPER_METRICS = ("AC", "F_score", "mIoU", "DS", "HD", "SSIM")
DEFAULT_KEYS = ("dataset", "backbone", "arch", "weighting", "task")


class PaperMetric(NamedTuple):
    """Where a paper column lives in our result rows: the compat key (what the paper computes), the correct key
    beside it, and the factor to the paper's units (100 for fractions)."""

    compat: str
    correct: str
    scale: float
    correct_meaning: str


def _paper_to_ours() -> dict[str, PaperMetric]:
    """The paper's columns from the task registry (each ``compat_`` metric names its column and the correct metric
    shown beside it)."""
    return {column: PaperMetric(f"test_{task}_{m.name}", f"test_{task}_{m.beside}", m.paper_scale, m.note)
            for column, (task, m) in paper_columns().items()}


PAPER_TO_OURS: dict[str, PaperMetric] = _paper_to_ours()


def paper_dir() -> Path:
    """Folder of the transcribed tables: ``$ENDOARSS_PAPER_DIR`` if set, else the package's own ``paper_tables/``
    (installed with the package, so a normal install reads them as a checkout does)."""
    return Path(os.environ.get("ENDOARSS_PAPER_DIR") or Path(__file__).resolve().parent / "paper_tables")


def _table_key(name: str | int) -> str:
    """'table2', 'Table II', 'II', '2' or 2 -> 'table2'."""
    text = re.sub(r"^table[\s_]*", "", str(name).strip().lower())
    number = _ROMAN.get(text) or (int(text) if text.isdigit() else None)
    key = f"table{number}"
    if key not in PAPER_TABLES:
        raise KeyError(f"unknown paper table {name!r}; known: {', '.join(PAPER_TABLES)} (or I..VII, 1..7)")
    return key


def load_paper_table(name: str | int) -> pd.DataFrame:
    """One transcribed table (see :data:`PAPER_TABLES`): key columns as strings, flags as bools, numbers as floats."""
    path = paper_dir() / _FILES[_table_key(name)]
    if not path.is_file():
        hint = ("ENDOARSS_PAPER_DIR is set: point it at a folder holding the table CSVs, or unset it to use the "
                "package's paper_tables/" if os.environ.get("ENDOARSS_PAPER_DIR") else
                "the package's paper_tables/ folder is incomplete: reinstall the package")
        raise FileNotFoundError(f"{path}: paper table missing ({hint})")
    df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"note": str})
    df["note"] = df["note"].fillna("")
    for column in _BOOL_COLUMNS:
        if column in df:
            df[column] = df[column].map({True: True, False: False, "True": True, "False": False})
    return df


def paper_table_for(dataset: str) -> pd.DataFrame:
    """The paper's main results table of a dataset (``synthetic_`` prefix ignored): Table II, III or IV."""
    name = re.sub(r"^synthetic_", "", str(dataset))
    if name not in MAIN_TABLES:
        raise KeyError(f"dataset={dataset!r}: the paper has main results for {', '.join(MAIN_TABLES)} only")
    return load_paper_table(MAIN_TABLES[name])


def ablation_variants(vit: str, cnn: str, sma: dict | None = None) -> dict[str, dict]:
    """Table V's rows as model options, row for row, in the table's order (read from ``table5_ablation.csv``).

    A row with DINOv2 (or SMA) runs on the ViT ``vit``, otherwise on the CNN ``cnn``; TESLA on -> ``arch="tesla"``,
    off -> ``arch="mmoe"`` (the architecture the paper's ablation falls back to); SMA on -> ``{"sma": True,
    **sma}``. Keys are ``"<row> <backbone> + <architecture>"`` (row 6 is EndoARSS itself)."""
    table = load_paper_table("table5")
    rows = table[table["dataset"] == table["dataset"].iloc[0]]
    out: dict[str, dict] = {}
    for number, row in enumerate(rows.itertuples(index=False), start=1):
        uses_vit = bool(row.DINOv2) or bool(row.SMA)
        options: dict = {"backbone": vit if uses_vit else cnn, "arch": "tesla" if row.TESLA else "mmoe"}
        if row.SMA:
            options.update({"sma": True, **(sma or {})})
        parts = ["DINOv2" if uses_vit else "ResNet"] + ["SMA"] * bool(row.SMA) + ["TESLA" if row.TESLA else "MMoE"]
        name = " + ".join(parts)
        if row.DINOv2 and row.TESLA and row.SMA:
            name = f"EndoARSS ({name})"
        out[f"{number} {name}"] = options
    return out


# ------------------------------------------------------------------------------------------------ our rows

def _paper_backbone(name, sma) -> str:
    """Our backbone name (+ SMA flag) in the paper's vocabulary: resnet101 | dinov2 | endoarss."""
    name = str(name)
    base, _, suffix = name.partition("+")
    if base in ("resnet101", "dinov2", "endoarss"):
        family = base
    elif base.startswith("resnet"):
        family = "resnet101"
    elif base.startswith(("dinov2", "vit")):
        family = "dinov2"
    else:
        return name
    with_sma = suffix == "sma" or (isinstance(sma, (bool, np.bool_)) and bool(sma))
    return "endoarss" if family == "dinov2" and with_sma else family


def _paper_task(tasks) -> str:
    """'cls+seg' (the paper's two tasks) -> both, 'cls' -> cls, 'seg' -> seg (already-paper values and rows with
    other tasks pass through)."""
    parts = set(str(tasks).split("+"))
    return "both" if parts == set(DEFAULT_TASKS) or tasks == "both" else str(tasks)


def to_paper_vocabulary(rows: pd.DataFrame) -> pd.DataFrame:
    """Our result rows with ``dataset / backbone / arch / weighting / task`` in the paper's vocabulary.

    The synthetic stand-ins map onto their real datasets (``synthetic_mtlesd`` -> ``mtlesd``) and the tiny test
    backbones onto their families; ``backbone_ours`` keeps the real name, and ``data`` says synthetic or real.
    """
    out = rows.copy()
    out["backbone_ours"] = out["backbone"].astype(str) if "backbone" in out else ""
    if "dataset" in out:
        out["dataset"] = out["dataset"].astype(str).str.replace(r"^synthetic_", "", regex=True)
    if "paper_backbone" in out:  # rows written by fit() carry ModelConfig.paper_backbone
        out["backbone"] = [pb if isinstance(pb, str) else _paper_backbone(b, s) for pb, b, s in
                           zip(out["paper_backbone"], out["backbone"], out.get("sma", pd.Series(False, index=out.index)))]
    elif "backbone" in out:
        sma = out["sma"] if "sma" in out else pd.Series(False, index=out.index)
        out["backbone"] = [_paper_backbone(b, s) for b, s in zip(out["backbone"], sma)]
    if "task" not in out:
        out["task"] = [_paper_task(t) for t in out["tasks"]] if "tasks" in out else "both"
    single = out["task"] != "both"
    if "arch" in out:
        out.loc[single, "arch"] = "single"
    if "weighting" in out:
        out["weighting"] = out["weighting"].astype(str).str.lower().str.replace("-", "_")
        out.loc[single, "weighting"] = "none"
    return out


def _provenance(group: pd.DataFrame) -> str:
    """'SYNTHETIC data' / 'real data' / 'MIXED ...', plus 'random-init backbone' when any run had one."""
    kinds = sorted(set(group["data"].dropna())) if "data" in group else []
    parts = {("synthetic",): "SYNTHETIC data", ("real",): "real data"}.get(tuple(kinds),
                                                                             "MIXED synthetic/real" if kinds else "")
    parts = [parts] if parts else []
    if "random_init_backbone" in group and group["random_init_backbone"].fillna(False).astype(bool).any():
        parts.append("random-init backbone")
    return "; ".join(parts) or "unknown provenance"


def _summarise_ours(ours: pd.DataFrame, on: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean over seeds of our compat / correct values (in the paper's units), run count and provenance per key."""
    records = []
    for key, group in ours.groupby(on, sort=False, dropna=False):
        record = dict(zip(on, key if isinstance(key, tuple) else (key,)))
        record["backbone_ours"] = ", ".join(sorted(set(group["backbone_ours"].astype(str))))
        record["runs"] = len(group)
        record["provenance"] = _provenance(group)
        for metric in metrics:
            spec = PAPER_TO_OURS[metric]
            record[f"{metric}_compat"] = _mean(group, spec.compat) * spec.scale
            record[f"{metric}_correct"] = _mean(group, spec.correct) * spec.scale
        records.append(record)
    return pd.DataFrame(records, columns=[*on, "backbone_ours", "runs", "provenance",
                                          *[f"{m}_{k}" for m in metrics for k in ("compat", "correct")]])


def _mean(group: pd.DataFrame, column: str) -> float:
    return float(pd.to_numeric(group[column], errors="coerce").mean()) if column in group else float("nan")


def compact(side: pd.DataFrame) -> pd.DataFrame:
    """A :func:`side_by_side` table narrow enough to read: the keys, then per paper metric the paper's value and
    ours computed the same way (``compat``) side by side; the correct values and notes stay in the full table."""
    keep = [c for c in side if not c.endswith(("_correct", "_pm_paper")) and c not in ("paper_note", "backbone_ours")]
    out = side[keep].copy()
    out.columns = [c.replace("_paper", " paper").replace("_compat", " ours") for c in keep]
    return out


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame, on: Sequence[str] = DEFAULT_KEYS,
                 how: str = "left") -> pd.DataFrame:
    """Our rows (mean over seeds) beside the paper's: ``<M>_paper | <M>_compat | <M>_correct`` per paper metric M.

    ``ours`` are result rows (:func:`endoarss_lib.training.engine.fit`); they are mapped to the paper's vocabulary
    first. ``_compat`` is our paper-compatible value in the paper's units (x100 for fractions), ``_correct`` the correct
    metric beside it (see :data:`PAPER_TO_OURS`). ``provenance`` marks synthetic data and random-init backbones.
    ``how="left"`` keeps our configurations, ``"outer"`` also the paper's rows we did not run.
    """
    on = list(on)
    missing = [k for k in on if k not in paper]
    if missing:
        raise KeyError(f"side_by_side: the paper table has no column(s) {missing}; its columns: {list(paper)}")
    if paper.duplicated(on).any():
        raise ValueError(f"side_by_side: paper rows are not unique on {on}; add a key (e.g. 'rank', 'corruption', "
                         f"'SMA') or filter the table first")
    metrics = [m for m in PAPER_METRICS if m in paper]
    mapped = to_paper_vocabulary(ours)
    absent = [k for k in on if k not in mapped]
    if absent:
        raise KeyError(f"side_by_side: our rows have no column(s) {absent}")
    summary = _summarise_ours(mapped, on, metrics)
    extra = [c for c in paper if c.endswith("_pm")]
    theirs = paper[on + metrics + extra + ["note"]].rename(
        columns={**{m: f"{m}_paper" for m in metrics}, **{c: f"{c}_paper" for c in extra}, "note": "paper_note"})
    merged = summary.merge(theirs, on=on, how=how)
    ordered = [*on, "backbone_ours", "runs", "provenance"]
    for metric in metrics:
        ordered += [f"{metric}_paper"] + [f"{metric}_pm_paper"] * (f"{metric}_pm" in extra)
        ordered += [f"{metric}_compat", f"{metric}_correct"]
    merged["paper_note"] = merged["paper_note"].fillna("")
    return merged[ordered + ["paper_note"]]
