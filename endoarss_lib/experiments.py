"""Experiment helpers for the notebooks: run a set of named configurations, evaluate a run on another dataset.

Everything goes through :func:`endoarss_lib.engine.fit`, so each run is resumable and a finished one is returned
instantly; a notebook rerun with the same parameters costs nothing.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .config import TrainConfig, preset
from .data import MTLDataset, get_spec
from .engine import _loader, evaluate, fit, load_run_model

__all__ = ["grid", "run_all", "evaluate_run_on", "subset_metrics", "delta_m_against_single", "per_class_spread",
           "model_options", "make_configs", "MAIN_METRICS", "DELTA_M_METRICS"]

# The metrics tables show by default: correct first, then the compat value that sits beside the paper's column.
MAIN_METRICS = ("test_cls_accuracy", "test_cls_macro_f1", "test_cls_compat_ac", "test_cls_compat_f1",
                "test_seg_miou", "test_seg_miou_fg", "test_seg_dice", "test_seg_hd95", "test_seg_ssim",
                "test_seg_compat_miou", "test_seg_compat_dice", "test_seg_compat_hd", "test_seg_compat_ssim")


# Metrics entering Delta_m (True: higher is better), LibMTL's convention.
DELTA_M_METRICS = {"test_cls_accuracy": True, "test_cls_macro_f1": True, "test_seg_miou": True, "test_seg_dice": True,
                   "test_seg_hd95": False}


def model_options(backbone: str, arch: str, **extra) -> dict:
    """build_model options for a backbone name with an optional ``+sma`` suffix (``dinov2_vitb14+sma``)."""
    name, _, suffix = backbone.partition("+")
    if suffix not in ("", "sma"):
        raise ValueError(f"backbone={backbone!r}: expected a registry name, optionally with '+sma'")
    return {"backbone": name, "arch": arch, "sma": suffix == "sma", **extra}


def make_configs(combos: Iterable[Mapping], *, single_task: bool = True, base_preset: str = "smoke",
                 model_extra: Mapping | None = None, weights: Mapping[str, str] | None = None,
                 **fields) -> dict[str, TrainConfig]:
    """Named TrainConfigs for combinations of ``backbone``, ``arch``, ``weighting``, ``seed`` (+ other model options).

    With ``single_task`` a cls-only and a seg-only baseline are added for every (backbone, seed). ``weights`` maps
    a backbone name to a local checkpoint (``pretrained=``). ``fields`` are TrainConfig fields shared by all runs
    (dataset, data_root, epochs, image_size, out_dir, ...).
    """
    configs: dict[str, TrainConfig] = {}
    for combo in combos:
        combo = dict(combo)
        backbone, arch = combo.pop("backbone"), combo.pop("arch")
        extra = dict(model_extra or {})
        if weights and backbone.partition("+")[0] in weights:
            extra["pretrained"] = weights[backbone.partition("+")[0]]
        weighting, seed = combo.pop("weighting", "ew"), combo.pop("seed", 0)
        name = f"{backbone} | {arch} | {weighting} | seed {seed}" + "".join(f" | {k}={v}" for k, v in combo.items())
        configs[name] = preset(base_preset, model=model_options(backbone, arch, **extra, **combo),
                               weighting=weighting, seed=seed, **fields)
        if single_task:
            for task in ("cls", "seg"):
                single = f"{backbone} | single {task} | seed {seed}"
                configs.setdefault(single, preset(base_preset, model=model_options(backbone, "single", tasks=[task],
                                                                                    **extra),
                                                  weighting="ew", seed=seed, **fields))
    return configs


def grid(**axes: Sequence) -> list[dict]:
    """Cartesian product of the axes as a list of dicts: ``grid(a=[1, 2], b=["x"])`` -> 2 dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def run_all(configs: Mapping[str, TrainConfig], progress: bool = True) -> pd.DataFrame:
    """Fit every named configuration (resuming or reusing finished runs); one result row per configuration."""
    from tqdm.auto import tqdm

    rows = []
    for name, cfg in tqdm(configs.items(), desc="runs", disable=not progress):
        rows.append({"name": name, **fit(cfg)})
    return pd.DataFrame(rows)


def subset_metrics(confusion: np.ndarray, ids: Iterable[int]) -> dict[str, float]:
    """Mean IoU and Dice over a subset of classes from a (truth x prediction) confusion matrix (NaN-safe)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    ids = list(ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    return {"miou": float(np.nanmean(iou[ids])), "dice": float(np.nanmean(dice[ids]))}


def evaluate_run_on(run_dir: str | Path, data_root: str | Path, dataset: str, image_size: int,
                    split: str = "test", device: str = "cpu", batch_size: int = 8) -> dict:
    """Metrics of a finished run's selected model on another dataset (e.g. MTLEndovis-Gen), with subset means.

    Besides the usual keys (over every class present), ``seg_miou_eval`` / ``seg_dice_eval`` average over the
    dataset's evaluated classes only (its registry ``eval_seg_classes``), and ``cls_accuracy`` counts all images.
    """
    from .metrics import SegmentationMeter

    model = load_run_model(run_dir, device=device)
    data = MTLDataset(data_root, split, dataset=dataset, image_size=image_size)
    spec = data.spec
    loader = _loader(data, TrainConfig(batch_size=batch_size, progress=False), shuffle=False)
    tasks = tuple(model.config.tasks)
    dev = torch.device(device)
    metrics = evaluate(model, loader, dev, tasks, spec.num_activities, spec.num_seg_classes, distances=True)
    if "seg" in tasks:
        meter = SegmentationMeter(spec.num_seg_classes, compute_distances=False, compute_ssim=False)
        with torch.no_grad():
            for batch in loader:
                meter.update(model(batch["image"].to(dev))["seg"].argmax(1).cpu(), batch["mask"])
        ids = spec.eval_seg_classes or range(spec.num_seg_classes)
        sub = subset_metrics(meter.compute()["confusion"], ids)
        metrics.update({"seg_miou_eval": sub["miou"], "seg_dice_eval": sub["dice"]})
    return {"dataset": spec.name, "data": "synthetic" if data.synthetic else "real", **metrics}


def delta_m_against_single(rows: pd.DataFrame, metrics: Mapping[str, bool] = DELTA_M_METRICS) -> pd.Series:
    """Delta_m of every multi-task row against the single-task rows of the same backbone, SMA flag and seed.

    Uses the cls-only run for ``test_cls_*`` metrics and the seg-only run for ``test_seg_*``; metrics that are not
    finite in all three runs are left out (so every value is comparable only with the same metric set: the column
    ``delta_m_metrics`` names it). NaN where a baseline is missing.
    """
    from .metrics import delta_m

    values, used = [], []
    key = ["backbone", "sma", "seed"]
    singles = rows[rows["arch"] == "single"]
    for _, row in rows.iterrows():
        match = singles[(singles[key] == row[key]).all(axis=1)]
        cls_base, seg_base = match[match["tasks"] == "cls"], match[match["tasks"] == "seg"]
        if row["arch"] == "single" or cls_base.empty or seg_base.empty:
            values.append(np.nan)
            used.append("")
            continue
        single = {k: (cls_base if k.startswith("test_cls") else seg_base).iloc[0].get(k, np.nan) for k in metrics}
        finite = [k for k in metrics if np.isfinite(row.get(k, np.nan)) and np.isfinite(single[k])
                  and single[k] != 0]
        values.append(delta_m({k: row[k] for k in finite}, {k: single[k] for k in finite},
                              {k: metrics[k] for k in finite}) if finite else np.nan)
        used.append(",".join(k.replace("test_", "") for k in finite))
    return pd.DataFrame({"delta_m": values, "delta_m_metrics": used}, index=rows.index)


@torch.no_grad()
def per_class_spread(run_dir: str | Path, data_root: str | Path, dataset: str, image_size: int,
                     split: str = "test", device: str = "cpu") -> dict[str, float]:
    """What the paper's Table V "+-" measures: the spread across activity classes, for one run (not over seeds).

    ``cls_per_class_accuracy_std``: standard deviation over activities of per-activity accuracy (recall);
    ``seg_fg_iou_std``: standard deviation over activities of the foreground-vs-background IoU of their images.
    """
    model = load_run_model(run_dir, device=device)
    data = MTLDataset(data_root, split, dataset=dataset, image_size=image_size)
    loader = _loader(data, TrainConfig(batch_size=8, progress=False), shuffle=False)
    labels, correct, inter, union = [], [], {}, {}
    for batch in loader:
        out = model(batch["image"].to(device))
        for i, label in enumerate(batch["label"].tolist()):
            labels.append(label)
            if "cls" in out:
                correct.append(int(out["cls"][i].argmax()) == label)
            if "seg" in out:
                pred, truth = out["seg"][i].argmax(0).cpu() > 0, batch["mask"][i] > 0
                inter[label] = inter.get(label, 0) + int((pred & truth).sum())
                union[label] = union.get(label, 0) + int((pred | truth).sum())
    result = {}
    if correct:
        per_class = [np.mean([c for c, l in zip(correct, labels) if l == k]) for k in sorted(set(labels))]
        result["cls_per_class_accuracy_std"] = float(np.std(per_class, ddof=0))
    if union:
        ious = [inter[k] / union[k] for k in sorted(union) if union[k] > 0]
        result["seg_fg_iou_std"] = float(np.std(ious, ddof=0))
    return result
