"""The paper's views of robustness frames (rows of :func:`endoarss_lib.robustness.evaluation.evaluate_corruptions`).

* :func:`table_vii`: per corruption, each metric averaged over severities, models side by side, their mean over the
  corruptions and the clean reference (Table VII);
* :func:`severity_table`: per severity, each metric averaged over corruptions (Fig. 6), severity 0 = clean;
* :func:`corruption_errors` / :func:`mean_corruption_error`: ImageNet-C's corruption error (CE, mCE) and relative CE
  of one model against a baseline.

Metrics are fractions in [0, 1] (``percent=True`` scales the tables by 100, the paper's unit); column labels come
from the task registry (:mod:`endoarss_lib.tasks`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..evaluation.paper import load_paper_table
from ..tasks import metric_info
from .corrupted_sets import CLEAN
from .corruptions import CORRUPTIONS, GROUP_OF

__all__ = ["table_vii", "severity_table", "corruption_errors", "mean_corruption_error", "column_name", "paper_beside",
           "metric_label"]

_KEY_COLUMNS = ("model", "corruption", "severity")


def metric_label(metric: str) -> str:
    """The short label of a result key from the task registry (``cls_accuracy`` -> ``AC``)."""
    try:
        return metric_info(metric)[1].label
    except KeyError:
        return metric


def column_name(metric: str, model: str) -> str:
    """The wide tables' column for one metric of one model, e.g. ``'AC (tiny ViT)'``."""
    return f"{metric_label(metric)} ({model})"


def _check_frame(frame, metrics: Sequence[str], models: Sequence[str] | None) -> tuple[pd.DataFrame, list[str]]:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"frame: expected a pandas DataFrame (from evaluate_corruptions), got "
                         f"{type(frame).__name__}")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("metrics: expected at least one metric column")
    missing = [c for c in (*_KEY_COLUMNS, *metrics) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing column(s) {missing}; it has {list(frame.columns)}")
    duplicated = frame.duplicated(list(_KEY_COLUMNS))
    if duplicated.any():
        first = frame.loc[duplicated, list(_KEY_COLUMNS)].iloc[0].tolist()
        raise ValueError(f"frame: (model, corruption, severity) {first} appears more than once; give every model a "
                         f"distinct name (model_name=...)")
    present = list(dict.fromkeys(frame["model"]))
    if models is None:
        models = present
    else:
        models = [models] if isinstance(models, str) else list(models)
        absent = [m for m in models if m not in present]
        if absent:
            raise ValueError(f"models: {absent} not in the frame (it has {present})")
    if not models:
        raise ValueError("frame: no rows")
    return frame[frame["model"].isin(models)], models


def _corrupted_grid(frame: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """The corrupted rows, checked to cover the same (corruption, severity) cells for every model, with every
    corruption at the same severities (otherwise averages would compare different things)."""
    corrupted = frame[frame["severity"] > 0]
    if corrupted.empty:
        raise ValueError("frame: no corrupted rows (severity >= 1)")
    cells = {m: set(map(tuple, corrupted.loc[corrupted["model"] == m, ["corruption", "severity"]].to_numpy()))
             for m in models}
    union = set().union(*cells.values())
    for m in models:
        lacking = sorted(union - cells[m])
        if lacking:
            raise ValueError(f"frame: model {m!r} lacks the cells {lacking[:6]}{' ...' if len(lacking) > 6 else ''}"
                             f" that other models have; evaluate every model on the same grid")
    per_corruption = corrupted.groupby("corruption")["severity"].apply(lambda s: tuple(sorted(set(s))))
    if per_corruption.nunique() > 1:
        raise ValueError(f"frame: corruptions were evaluated at different severities "
                         f"({per_corruption.to_dict()}); averages over them would not be comparable")
    return corrupted


def _corruption_order(names) -> list[str]:
    names = set(names)
    return [n for n in CORRUPTIONS if n in names] + sorted(names - set(CORRUPTIONS))


def table_vii(frame: pd.DataFrame, metrics: Sequence[str] = ("cls_accuracy", "seg_miou"),
              models: Sequence[str] | None = None, clean: bool = True, percent: bool = False) -> pd.DataFrame:
    """Table VII: per corruption, each metric averaged over its severities, one column per (metric, model).

    Rows: the corruptions in the paper's order (column ``group`` gives noise / blur / occlusion / digital), then
    ``mean`` (the unweighted mean of the per-corruption averages, the paper's "Mean" row) and, with ``clean`` and
    severity-0 rows present, ``clean``. Columns are named by :func:`column_name`. ``percent`` multiplies by 100.
    """
    frame, models = _check_frame(frame, metrics, models)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    corrupted = _corrupted_grid(frame, models)
    per = corrupted.groupby(["model", "corruption"])[metrics].mean()
    order = _corruption_order(corrupted["corruption"].unique())
    rows = []
    for name in order:
        rows.append({"group": GROUP_OF.get(name, ""), "corruption": name,
                     **{column_name(m, model): per.loc[(model, name), m] for m in metrics for model in models}})
    table = pd.DataFrame(rows)
    value_columns = [column_name(m, model) for m in metrics for model in models]
    extra = [{"group": "", "corruption": "mean", **table[value_columns].mean().to_dict()}]
    clean_rows = frame[frame["severity"] == 0]
    if clean and set(clean_rows["model"]) >= set(models):
        reference = clean_rows.groupby("model")[metrics].mean()
        extra.append({"group": CLEAN, "corruption": CLEAN,
                      **{column_name(m, model): reference.loc[model, m] for m in metrics for model in models}})
    table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    if percent:
        table[value_columns] = table[value_columns] * 100
    return table


def severity_table(frame: pd.DataFrame, metrics: Sequence[str] = ("cls_accuracy", "seg_miou"),
                   models: Sequence[str] | None = None, percent: bool = False) -> pd.DataFrame:
    """Fig. 6's data: per severity, each metric averaged over the corruptions (unweighted), one column per
    (metric, model). Severity 0 is the clean reference when the frame has it; ``n_corruptions`` counts what was
    averaged. With a complete grid the mean over severities 1..5 equals :func:`table_vii`'s ``mean`` row."""
    frame, models = _check_frame(frame, metrics, models)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    corrupted = _corrupted_grid(frame, models)
    clean_rows = frame[frame["severity"] == 0]
    use = pd.concat([clean_rows, corrupted]) if set(clean_rows["model"]) >= set(models) else corrupted
    per = use.groupby(["model", "severity"])[metrics].mean()
    counts = use[use["model"] == models[0]].groupby("severity")["corruption"].nunique()
    rows = []
    for severity in sorted(use["severity"].unique()):
        rows.append({"severity": int(severity),
                     "n_corruptions": 0 if severity == 0 else int(counts.loc[severity]),
                     **{column_name(m, model): per.loc[(model, severity), m] for m in metrics for model in models}})
    table = pd.DataFrame(rows)
    if percent:
        value_columns = [column_name(m, model) for m in metrics for model in models]
        table[value_columns] = table[value_columns] * 100
    return table


def corruption_errors(frame: pd.DataFrame, model: str, baseline: str, metric: str = "cls_accuracy") -> pd.DataFrame:
    """Corruption error of ``model`` relative to ``baseline`` per corruption, and their means (ImageNet-C).

    With error E = 1 - metric (``metric`` a fraction in [0, 1] where higher is better: accuracy, mIoU, Dice ...),
    E^f_{s,c} the error of model f on corruption c at severity s and E^f_clean its clean error (Hendrycks &
    Dietterich, ICLR 2019):

    * CE^f_c = sum_s E^f_{s,c} / sum_s E^base_{s,c};  mCE = mean over corruptions c of CE^f_c;
    * relative CE^f_c = sum_s (E^f_{s,c} - E^f_clean) / sum_s (E^base_{s,c} - E^base_clean);  relative mCE = their
      mean. It measures the degradation, not the level: a model can have mCE < 1 (fewer errors) and relative
      mCE > 1 (degrades faster than the baseline from a better start).

    CE < 1 (below 100 %) means fewer errors than the baseline; the baseline against itself gives 1. A corruption on
    which the baseline makes no error at all (or, for the relative CE, does not degrade: a summed degradation <= 0)
    has no defined ratio: it is NaN there and left out of the means (column ``n`` of the ``mean`` row counts the
    corruptions used). The relative columns are NaN when either model lacks a clean (severity 0) row.

    Returns one row per corruption (``group, corruption, error, baseline_error, ce, relative_degradation,
    baseline_relative_degradation, relative_ce, n, n_relative``; the error columns are sums over severities, ``n``
    / ``n_relative`` are 1 where the ratio is defined) and a final ``mean`` row holding mCE in ``ce``, relative mCE
    in ``relative_ce`` and the counts of corruptions they average.
    """
    checked, models = _check_frame(frame, [metric], list(dict.fromkeys([model, baseline])))
    values = checked[metric].to_numpy(dtype=float)
    if np.any((values < 0) | (values > 1)):
        raise ValueError(f"metric={metric!r}: expected a fraction in [0, 1] where higher is better (error = 1 - "
                         f"metric); found values outside [0, 1]")
    corrupted = _corrupted_grid(checked, models)
    errors = 1.0 - corrupted.pivot_table(index=["corruption", "severity"], columns="model", values=metric,
                                         aggfunc="first")
    summed = errors.groupby(level="corruption").sum()
    clean = checked[checked["severity"] == 0].groupby("model")[metric].mean()
    has_clean = model in clean.index and baseline in clean.index
    n_sev = errors.groupby(level="corruption").size()
    rows = []
    for name in _corruption_order(summed.index):
        e, b = float(summed.loc[name, model]), float(summed.loc[name, baseline])
        row = {"group": GROUP_OF.get(name, ""), "corruption": name, "error": e, "baseline_error": b,
               "ce": e / b if b > 0 else np.nan}
        if has_clean:
            d = e - n_sev.loc[name] * (1.0 - clean.loc[model])
            db = b - n_sev.loc[name] * (1.0 - clean.loc[baseline])
            row.update(relative_degradation=d, baseline_relative_degradation=db,
                       relative_ce=d / db if db > 0 else np.nan)
        else:
            row.update(relative_degradation=np.nan, baseline_relative_degradation=np.nan, relative_ce=np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    table["n"] = table["ce"].notna().astype(int)  # 1: the corruption enters mCE; the mean row: how many did
    table["n_relative"] = table["relative_ce"].notna().astype(int)
    mean = {"group": "", "corruption": "mean", "error": table["error"].mean(),
            "baseline_error": table["baseline_error"].mean(), "ce": table["ce"].mean(skipna=True),
            "relative_degradation": table["relative_degradation"].mean(),
            "baseline_relative_degradation": table["baseline_relative_degradation"].mean(),
            "relative_ce": table["relative_ce"].mean(skipna=True), "n": int(table["n"].sum()),
            "n_relative": int(table["n_relative"].sum())}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    table.attrs.update(model=model, baseline=baseline, metric=metric)
    return table


def mean_corruption_error(frame: pd.DataFrame, model: str, baseline: str, metric: str = "cls_accuracy") -> dict:
    """``{'mce', 'relative_mce', 'n_corruptions', 'n_corruptions_relative', 'clean_error', 'baseline_clean_error'}``
    of ``model`` against ``baseline`` (definitions in :func:`corruption_errors`; 1.0 = the baseline's 100 %)."""
    table = corruption_errors(frame, model, baseline, metric)
    mean = table.iloc[-1]
    clean = frame[(frame["severity"] == 0)].groupby("model")[metric].mean()
    return {"metric": metric, "model": model, "baseline": baseline, "mce": float(mean["ce"]),
            "relative_mce": float(mean["relative_ce"]), "n_corruptions": int(mean["n"]),
            "n_corruptions_relative": int(mean["n_relative"]),
            "clean_error": float(1 - clean[model]) if model in clean.index else np.nan,
            "baseline_clean_error": float(1 - clean[baseline]) if baseline in clean.index else np.nan}


def paper_beside(table: pd.DataFrame, data: str = "synthetic") -> pd.DataFrame:
    """The paper's Table VII (AC and mIoU per corruption, per model) beside ours (a :func:`table_vii` of the
    ``compat_`` metrics in %), one row per corruption in the paper's order, then ``mean`` (and our ``clean``).

    The paper's columns are what its evaluation computes, so they sit beside our ``cls_compat_ac`` /
    ``seg_compat_miou``; ``data`` labels our side (SYNTHETIC data are not comparable, only the procedure is)."""
    paper = load_paper_table("table7")
    paper = paper.assign(model=paper["backbone"] + " + " + paper["arch"])
    wide = paper.pivot_table(index="corruption", columns="model", values=["AC", "mIoU"], aggfunc="first")
    wide.columns = [f"paper {metric} ({model})" for metric, model in wide.columns]
    ours = table.set_index("corruption").drop(columns="group")
    ours.columns = [f"ours ({data}) {c}" for c in ours.columns]
    order = [n for n in CORRUPTIONS if n in wide.index or n in ours.index] + ["mean"]
    order += [CLEAN] if CLEAN in ours.index else []
    return wide.join(ours, how="outer").reindex(order).reset_index().rename(columns={"index": "corruption"})
