"""Robustness under the paper's 19 corruptions x 5 severities (Sec. IV-C5, Table VII, Fig. 6).

:func:`evaluate_corruptions` evaluates one trained model (a run folder or a module) on the whole test split corrupted
by every (corruption, severity) cell that :func:`endoarss_lib.corruptions.build_corrupted_set` writes, plus a clean
reference cell (severity 0) that goes through the same resize-and-PNG path, and returns one row per cell. Each cell's
metrics are cached as a small JSON file keyed by the model (config hash + checkpoint hash, or a hash of the module's
weights), the cell's own key (dataset content, corruption, severity, seed, size, generator and package versions) and
the evaluation settings, so a rerun only evaluates what changed. Segmentation is always scored against the cell's own
masks, which the builder warps for geometric corruptions (elastic transform).

The rest turns such frames (one or several models concatenated) into the paper's views:

* :func:`table_vii`: per corruption, each metric averaged over severities, models side by side, their mean over the
  corruptions and the clean reference (Table VII);
* :func:`severity_table`: per severity, each metric averaged over corruptions (Fig. 6), severity 0 = clean;
* :func:`corruption_errors` / :func:`mean_corruption_error`: ImageNet-C's corruption error (CE, mCE) and relative
  CE of one model against a baseline;
* :func:`corruption_grid`, :func:`plot_severity_curves`, :func:`save_small_png`: the figures;
  :func:`benchmark_corruptions`: seconds per image per corruption.

Metrics are fractions in [0, 1] (``percent=True`` scales the tables by 100, the paper's unit).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_path, write_json_atomic
from .corruptions import CORRUPTION_GROUPS, CORRUPTIONS, DONE_NAME, SEVERITIES, build_corrupted_set, corrupt

__all__ = ["CLEAN", "METRIC_LABELS", "GROUP_OF", "EVAL_VERSION", "evaluate_corruptions", "model_key", "table_vii",
           "severity_table", "corruption_errors", "mean_corruption_error", "corruption_grid", "plot_severity_curves",
           "save_small_png", "benchmark_corruptions", "column_name"]

CLEAN = "clean"  # the corruption name of the clean reference row (severity 0, group "clean")
EVAL_VERSION = "1"  # bump when the evaluation itself changes, so cached cell results are recomputed
METRIC_LABELS: Mapping[str, str] = {"cls_accuracy": "AC", "cls_macro_f1": "F1", "seg_miou": "mIoU",
                                    "seg_miou_fg": "mIoU_fg", "seg_dice": "Dice", "seg_dice_fg": "Dice_fg",
                                    "seg_pixel_acc": "PixAcc", "cls_compat_ac": "compat AC",
                                    "cls_compat_f1": "compat F1", "seg_compat_miou": "compat mIoU",
                                    "seg_compat_dice": "compat Dice"}
GROUP_OF: Mapping[str, str] = {name: group for group, names in CORRUPTION_GROUPS.items() for name in names}
_KEY_COLUMNS = ("model", "corruption", "severity")
_CACHE_DIR, _CELLS_DIR = "evals", "corrupted"


# ------------------------------------------------------------------------------------------------- evaluation

def evaluate_corruptions(model, data_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                         dataset: str | None = None, image_size: int | None = None,
                         names: Sequence[str] | str = CORRUPTIONS, severities: Sequence[int] | int = SEVERITIES,
                         seed: int = 0, workers: int = 2, device: str = "cpu", batch_size: int = 16,
                         distances: bool = False, amp: str = "off", model_name: str | None = None,
                         id_map=None, ignore_index: int = 255, clean: bool = True,
                         progress: bool = True) -> pd.DataFrame:
    """Evaluate ``model`` on the clean and every corrupted test set; one row per (corruption, severity).

    ``model``: a run folder (``fit``'s ``run_dir``; its selected ``best.pt`` is loaded, and ``dataset`` /
    ``image_size`` default to its config) or a built ``torch.nn.Module`` (then ``dataset`` and ``image_size`` are
    required). ``data_root`` holds the clean dataset (``<root>/test/<activity>/image|mask``). Corrupted cells are
    written under ``out_dir/corrupted/<H>x<W>/<name>/<severity>`` (``workers`` processes; shared by every model
    evaluated with the same ``out_dir``) and per-cell results under ``out_dir/evals/<model key>/``.

    Columns: ``model, data (synthetic|real), dataset, image_size, corruption, group, severity`` (0 and group
    ``clean`` for the clean reference), ``n_images``, the metrics of :func:`endoarss_lib.engine.evaluate` (``cls_*``,
    ``seg_*``, correct and ``compat_``; boundary distances and SSIM only with ``distances=True``),
    ``random_init_backbone``, ``seed``, ``model_key`` and ``cached`` (True when the row came from the cache).
    """
    from .engine import resolve_device

    names = _check_names(names)
    severities = _check_severities(severities)
    for label, value, low in (("seed", seed, 0), ("workers", workers, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{label}={value!r}: expected an integer >= {low}")
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp={amp!r}: expected 'auto', 'bf16' or 'off'")
    data_root = Path(data_root)
    if not (data_root / "test").is_dir():
        raise ValueError(f"data_root={str(data_root)!r}: no test split there (expected <root>/test/<activity>/image)")
    torch_device = resolve_device(device)

    if isinstance(model, (str, os.PathLike)):
        run = Path(model)
        config = _run_config(run)
        dataset = dataset if dataset is not None else config["dataset"]
        image_size = image_size if image_size is not None else config["image_size"]
        key = model_key(run)
        label = model_name or run.name
        net = _load_run_model(run, config, str(torch_device))
    elif isinstance(model, torch.nn.Module):
        if dataset is None or image_size is None:
            raise ValueError("dataset and image_size are required when model is a module (a run folder supplies "
                             "them from its config)")
        key, label, net = model_key(model), model_name or type(model).__name__, model.to(torch_device)
    else:
        raise ValueError(f"model: expected a run folder (str or Path) or a torch.nn.Module, got "
                         f"{type(model).__name__}")
    if not isinstance(dataset, str):
        raise ValueError(f"dataset={dataset!r}: expected a registry name such as 'mtlesd'")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size={image_size!r}: expected an integer >= 32 (the evaluation resolution)")
    image_size = int(image_size)
    tasks = tuple(getattr(net, "tasks", ("cls", "seg")))

    out_dir = Path(out_dir)
    cells_dir = out_dir / _CELLS_DIR / f"{image_size}x{image_size}"
    cells = build_corrupted_set(data_root, cells_dir, names=names, severities=severities, seed=seed,
                                image_size=image_size, workers=workers, progress=progress)
    if clean:
        cells = {(CLEAN, 0): _clean_cell(data_root, cells_dir, image_size), **cells}
    settings = {"distances": bool(distances), "amp": amp, "ignore_index": int(ignore_index),
                "id_map": id_map, "eval_version": EVAL_VERSION}
    cache = out_dir / _CACHE_DIR / key
    rows = []
    from tqdm.auto import tqdm

    for (name, severity), cell in tqdm(cells.items(), desc=f"evaluating {label}", unit="cell",
                                       disable=not progress):
        cell_key = json.loads((cell / DONE_NAME).read_text())["key"]
        entry_key = {"model": key, "cell": cell_key, **settings}
        path = cache / f"{name}_s{severity}.json"
        entry = _read_cache(path, entry_key)
        cached = entry is not None
        if not cached:
            entry = _evaluate_cell(net, cell, dataset, image_size, tasks, torch_device, batch_size, id_map,
                                   ignore_index, distances, amp)
            entry["key"] = entry_key
            write_json_atomic(path, entry)
        rows.append({"model": label, "data": entry["data"], "dataset": dataset, "image_size": image_size,
                     "corruption": name, "group": CLEAN if name == CLEAN else GROUP_OF[name],
                     "severity": int(severity), "n_images": entry["n_images"], **entry["metrics"],
                     "random_init_backbone": bool(getattr(net, "pretrained_random_init", False)),
                     "seed": int(seed), "model_key": key, "cached": cached})
    return pd.DataFrame(rows)


def model_key(model) -> str:
    """A short hash naming a model's weights: a run's config hash + its ``best.pt`` bytes, or a module's tensors."""
    digest = hashlib.sha256()
    if isinstance(model, (str, os.PathLike)):
        run = Path(model)
        digest.update(str(_run_config(run).get("config_hash", "")).encode())
        best = run / "best.pt"
        if not best.is_file():
            raise ValueError(f"model={str(run)!r}: no best.pt (is the run finished? fit() writes it)")
        with best.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    elif isinstance(model, torch.nn.Module):
        digest.update(type(model).__qualname__.encode())
        digest.update(repr(tuple(getattr(model, "tasks", ()))).encode())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        raise ValueError(f"model: expected a run folder or a torch.nn.Module, got {type(model).__name__}")
    return digest.hexdigest()[:16]


def _load_run_model(run: Path, config: dict, device: str):
    """A run's selected model with the very weights it was trained and tested with.

    ``engine.load_run_model`` restores the trainable weights from ``best.pt`` but rebuilds the frozen ones (a
    randomly initialised backbone: they are not in the checkpoint) from whatever the global RNG holds. Training built
    the model right after ``seed_everything(cfg.seed)``, so rebuild it under that seed too (inside a forked RNG, so
    the caller's random state is left as it was)."""
    import random

    from .engine import load_run_model, seed_everything

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            seed_everything(int(config.get("seed", 0)))
            return load_run_model(run, device=device)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _run_config(run: Path) -> dict:
    path = run / "config.json"
    if not path.is_file():
        raise ValueError(f"model={str(run)!r}: not a run folder (no config.json; pass fit()'s run_dir)")
    return json.loads(path.read_text())


def _check_names(names) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("names: expected at least one corruption name")
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"names: unknown corruption(s) {unknown}; valid names: {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names={list(names)}: a corruption is listed twice")
    return names


def _check_severities(severities) -> tuple[int, ...]:
    severities = (severities,) if isinstance(severities, (int, np.integer)) else tuple(severities)
    if not severities:
        raise ValueError("severities: expected at least one severity in 1..5")
    bad = [s for s in severities if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s not in SEVERITIES]
    if bad:
        raise ValueError(f"severities: {bad} not in 1..5")
    if len(set(severities)) != len(severities):
        raise ValueError(f"severities={list(severities)}: a severity is listed twice")
    return tuple(int(s) for s in severities)


def _read_cache(path: Path, key: dict) -> dict | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # compare through JSON so tuples / lists and int / str keys read back alike
    return entry if entry.get("key") == json.loads(json.dumps(key, default=str)) else None


def _evaluate_cell(net, cell: Path, dataset: str, image_size: int, tasks, device, batch_size: int, id_map,
                   ignore_index: int, distances: bool, amp: str) -> dict:
    from torch.utils.data import DataLoader

    from .data import MTLDataset
    from .engine import evaluate

    data = MTLDataset(cell, "test", dataset=dataset, image_size=image_size, id_map=id_map,
                      ignore_index=ignore_index)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    start = time.perf_counter()
    metrics = evaluate(net, loader, device, tasks, num_activities=data.spec.num_activities,
                       num_seg_classes=data.spec.num_seg_classes, distances=distances, amp=amp,
                       ignore_index=ignore_index)
    if not distances:  # not computed: leave the NaN placeholders out of the rows
        metrics = {k: v for k, v in metrics.items() if "hd" not in k and "ssim" not in k}
    return {"data": "synthetic" if data.synthetic else "real", "n_images": len(data), "metrics": metrics,
            "seconds": round(time.perf_counter() - start, 3)}


def _clean_cell(root: Path, cells_dir: Path, image_size: int) -> Path:
    """The clean test split through the corrupted cells' exact path (PIL resize to the evaluation size, PNG), so
    clean and corrupted rows differ only by the corruption."""
    from . import corruptions as C

    size = (image_size, image_size)
    samples = C._list_split(root, "test")
    key = C.cell_key(C._fingerprint(root, samples), "test", CLEAN, 0, 0, size)
    cell = cells_dir / CLEAN / "0"
    if C._is_done(cell, key):
        return cell
    C._reset_cell(cell, root)
    from PIL import Image

    for image_rel, mask_rel in samples:
        image = C._resize(Image.open(root / image_rel).convert("RGB"), list(size), Image.BILINEAR)
        C._write_atomic((cell / image_rel).with_suffix(".png"), C._png_bytes(image))
        if mask_rel is not None:
            source = Image.open(root / mask_rel)
            if source.size == (size[1], size[0]):
                C._copy_atomic(root / mask_rel, cell / mask_rel)
            else:
                mask = np.asarray(C._resize(source, list(size), Image.NEAREST))
                C._write_atomic(cell / mask_rel, C._png_bytes(C._like(mask, source)))
    marker = {"key": key, "images": len(samples), "finished": time.time()}
    C._write_atomic(cell / DONE_NAME, json.dumps(marker, indent=2).encode())
    return cell


# ------------------------------------------------------------------------------------------------- aggregation

def column_name(metric: str, model: str) -> str:
    """The wide tables' column for one metric of one model, e.g. ``'AC (tiny ViT)'``."""
    return f"{METRIC_LABELS.get(metric, metric)} ({model})"


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


# ------------------------------------------------------------------------------------------------- figures

def corruption_grid(image: np.ndarray, names: Sequence[str] | str = CORRUPTIONS,
                    severities: Sequence[int] | int = SEVERITIES, seed: int = 0, note: str = "",
                    panel_inches: float = 0.9):
    """A figure: one row per corruption (clean image, then each severity), the group beside the name."""
    import matplotlib.pyplot as plt

    names, severities = _check_names(names), _check_severities(severities)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image: expected a uint8 (H, W, 3) RGB array (e.g. np.asarray(PIL.Image.open(...)))")
    cols = 1 + len(severities)
    fig, axes = plt.subplots(len(names), cols, squeeze=False,
                             figsize=(panel_inches * cols + 1.3, panel_inches * len(names) + 0.7))
    for row, name in enumerate(names):
        panels = [image] + [corrupt(image, name, s, seed) for s in severities]
        for col, picture in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(CLEAN if col == 0 else f"severity {severities[col - 1]}", fontsize=7)
        axes[row, 0].set_ylabel(f"{name}\n({GROUP_OF[name]})", fontsize=6.5, rotation=0, ha="right", va="center")
    fig.suptitle(f"{len(names)} corruptions x {len(severities)} severities{chr(10) + note if note else ''}",
                 fontsize=7.5, y=1 - 0.08 / fig.get_figheight())
    fig.subplots_adjust(wspace=0.04, hspace=0.04, left=0.2, right=0.99, top=1 - 0.62 / fig.get_figheight(),
                        bottom=0.01)
    return fig


def plot_severity_curves(frame: pd.DataFrame, metrics: Sequence[str] = ("cls_accuracy", "seg_miou"),
                         models: Sequence[str] | None = None, note: str = "", percent: bool = True):
    """Fig. 6: each metric against severity (0 = clean), averaged over the corruptions, one line per model."""
    import matplotlib.pyplot as plt

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    table = severity_table(frame, metrics, models, percent=percent)
    _, models = _check_frame(frame, metrics, models)
    fig, axes = plt.subplots(1, len(metrics), squeeze=False, figsize=(4.2 * len(metrics), 3.3))
    for ax, metric in zip(axes[0], metrics):
        for model in models:
            ax.plot(table["severity"], table[column_name(metric, model)], marker="o", label=model)
        ax.set_xticks(table["severity"])
        ax.set_xticklabels([CLEAN if s == 0 else str(s) for s in table["severity"]])
        ax.set_xlabel("severity")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}{' (%)' if percent else ''}")
        ax.ticklabel_format(axis="y", useOffset=False)
        values = table[[column_name(metric, m) for m in models]].to_numpy(dtype=float)
        low, high = np.nanmin(values), np.nanmax(values)
        span = 5.0 if percent else 0.05  # a flat curve should look flat, not like noise blown up to full height
        if high - low < span:
            ax.set_ylim((low + high) / 2 - span / 2 - span / 10, (low + high) / 2 + span / 2 + span / 10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    n = int(table["n_corruptions"].max())
    fig.suptitle(f"Mean over {n} corruptions per severity{(' - ' + note) if note else ''}", fontsize=8)
    fig.tight_layout()
    return fig


def save_small_png(fig, path: str | os.PathLike, dpi: int = 80, colors: int = 128) -> Path:
    """Save a figure as a small PNG (palette of ``colors`` colours, no dithering), atomically; returns the path."""
    from PIL import Image

    if not 2 <= colors <= 256:
        raise ValueError(f"colors={colors!r}: expected 2..256")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    buffer.seek(0)
    small = Image.open(buffer).convert("RGB").quantize(colors, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return Path(path)


def benchmark_corruptions(image: np.ndarray, names: Sequence[str] | str = CORRUPTIONS,
                          severities: Sequence[int] | int = SEVERITIES, repeats: int = 3,
                          seed: int = 0) -> pd.DataFrame:
    """Seconds per image of each corruption on ``image`` (mean over severities and repeats, after one warm-up call
    that absorbs one-off costs such as imports). A measurement for notebooks and benchmarks, not a test."""
    names, severities = _check_names(names), _check_severities(severities)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: expected an integer >= 1")
    rows = []
    for name in names:
        corrupt(image, name, severities[0], seed)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for s in severities:
                corrupt(image, name, s, seed)
        seconds = (time.perf_counter() - start) / (repeats * len(severities))
        rows.append({"group": GROUP_OF[name], "corruption": name, "image_px": f"{image.shape[0]}x{image.shape[1]}",
                     "seconds_per_image": seconds})
    return pd.DataFrame(rows)
