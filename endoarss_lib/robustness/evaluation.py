"""Robustness under the paper's 19 corruptions x 5 severities (Sec. IV-C5, Table VII, Fig. 6): evaluation.

:func:`evaluate_corruptions` evaluates one trained model (a run folder or a module) on the whole test split corrupted
by every (corruption, severity) cell that :func:`endoarss_lib.robustness.corrupted_sets.build_corrupted_set` writes,
plus a clean reference cell (severity 0) that goes through the same resize-and-PNG path, and returns one row per cell.
Each cell's metrics are cached as a small JSON file keyed by the model (config hash + checkpoint hash, or a hash of the
module's weights), the cell's own key (dataset content, corruption, severity, seed, size, generator and package
versions) and the evaluation settings, so a rerun only evaluates what changed. Segmentation is always scored against the
cell's own masks, which the builder warps for geometric corruptions (elastic transform).

The paper's views of such frames (Table VII, Fig. 6 per-severity means, corruption errors) are in
:mod:`endoarss_lib.robustness.report`; the figures in :mod:`endoarss_lib.experiments.viz`. Metrics are fractions
in [0, 1].
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from ..data import MTLDataset
from ..evaluation.inference import load_run_model
from ..models.pretrained import is_synthetic_pretrained
from ..tasks import DEFAULT_TASKS, metric_info
from ..training.engine import COMPAT_SIZE, evaluate, read_per_image, resolve_device, write_per_image
from ..training.rows import ResultRow
from ..version import provenance
from .corrupted_sets import CLEAN, DONE_NAME, build_corrupted_set, clean_cell
from .corruptions import CORRUPTIONS, GROUP_OF, SEVERITIES, check_names, check_severities

__all__ = ["CLEAN", "EVAL_VERSION", "evaluate_corruptions", "model_key", "pooled_outcomes"]

# bump when the evaluation itself changes, so cached cell results are recomputed. 2: compat_ values at the released
# 244 x 244 resolution; 3: every cell also keeps its per-image outcomes (<cell>.npz)
EVAL_VERSION = "3"
_CACHE_DIR, _CELLS_DIR = "evals", "corrupted"


# ------------------------------------------------------------------------------------------------- evaluation

def evaluate_corruptions(model, data_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                         dataset: str | None = None, image_size: int | None = None,
                         names: Sequence[str] | str = CORRUPTIONS, severities: Sequence[int] | int = SEVERITIES,
                         seed: int = 0, workers: int = 2, device: str = "cpu", batch_size: int = 16,
                         distances: bool = False, amp: str = "off", model_name: str | None = None,
                         id_map=None, ignore_index: int = 255, clean: bool = True,
                         progress: bool = True, outcomes: dict | None = None) -> pd.DataFrame:
    """Evaluate ``model`` on the clean and every corrupted test set; one row per (corruption, severity).

    ``model``: a run folder (``fit``'s ``run_dir``; its selected ``best.pt`` is loaded, and ``dataset`` /
    ``image_size`` default to its config) or a built ``torch.nn.Module`` (then ``dataset`` and ``image_size`` are
    required). ``data_root`` holds the clean dataset (``<root>/test/<activity>/image|mask``). Corrupted cells are
    written under ``out_dir/corrupted/<H>x<W>/<name>/<severity>`` (``workers`` processes; shared by every model
    evaluated with the same ``out_dir``) and per-cell results under ``out_dir/evals/<model key>/``.

    Rows have the schema of every result row (:class:`endoarss_lib.training.rows.ResultRow`, ``source`` "robustness";
    the model's backbone, architecture, weighting and config hash where known; provenance as recorded when the cell was
    evaluated, None for cells cached before it was recorded) and the cell's own columns: ``model, corruption, group,
    severity`` (0 and group ``clean`` for the clean reference), ``n_images``, ``model_key`` and ``cached`` (True when
    the row came from the cache). ``seed`` is the corruption seed. The metrics are those of
    :func:`endoarss_lib.training.engine.evaluate` (``cls_*``, ``seg_*``, correct and ``compat_``; boundary distances and
    SSIM only with ``distances=True``).

    ``outcomes``: a dict that receives the per-image outcomes pooled over the corruptions (:func:`pooled_outcomes`),
    keyed ``"all"`` (every corrupted cell) and by severity (``0``: clean): what the robustness claims are decided on.
    """
    names = check_names(names)
    severities = check_severities(severities)
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
        net = load_run_model(run, device=str(torch_device))
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
    tasks = tuple(getattr(net, "tasks", DEFAULT_TASKS))
    identity = _identity(net, Path(model) if isinstance(model, (str, os.PathLike)) else None)

    out_dir = Path(out_dir)
    cells_dir = out_dir / _CELLS_DIR / f"{image_size}x{image_size}"
    cells = build_corrupted_set(data_root, cells_dir, names=names, severities=severities, seed=seed,
                                image_size=image_size, workers=workers, progress=progress)
    if clean:
        cells = {(CLEAN, 0): clean_cell(data_root, cells_dir, image_size), **cells}
    settings = {"distances": bool(distances), "amp": amp, "ignore_index": int(ignore_index),
                "id_map": id_map, "eval_version": EVAL_VERSION}
    cache = out_dir / _CACHE_DIR / key
    rows = []
    per_cell: dict[int, list[Path]] = {}

    for (name, severity), cell in tqdm(cells.items(), desc=f"evaluating {label}", unit="cell",
                                       disable=not progress):
        cell_key = json.loads((cell / DONE_NAME).read_text())["key"]
        entry_key = {"model": key, "cell": cell_key, **settings}
        path = cache / f"{name}_s{severity}.json"
        entry = _read_cache(path, entry_key)
        arrays_path = path.with_suffix(".npz")
        cached = entry is not None and arrays_path.is_file()
        if not cached:
            entry, arrays = _evaluate_cell(net, cell, dataset, image_size, tasks, torch_device, batch_size, id_map,
                                           ignore_index, distances, amp)
            entry["key"] = entry_key
            write_per_image(arrays_path, arrays)  # before the entry: a cached entry always has its outcomes
            write_json_atomic(path, entry)
        if outcomes is not None:
            per_cell.setdefault(int(severity), []).append(arrays_path)
        recorded = {k: entry.get("provenance", {}).get(k) for k in _PROVENANCE}  # when the cell was evaluated
        rows.append(ResultRow(
            source="robustness", dataset=dataset, data=entry["data"], tasks="+".join(tasks), image_size=image_size,
            random_init_backbone=bool(getattr(net, "pretrained_random_init", False)),
            synthetic_pretrained_backbone=is_synthetic_pretrained(getattr(net, "weights", None)), seed=int(seed),
            metrics=entry["metrics"], **identity, **recorded,
            extra={"model": label, "corruption": name, "group": CLEAN if name == CLEAN else GROUP_OF[name],
                   "severity": int(severity), "n_images": entry["n_images"], "model_key": key,
                   "cached": cached}).to_dict())
    if outcomes is not None:
        outcomes.update({sev: pooled_outcomes(paths) for sev, paths in per_cell.items()})
        corrupted = [p for sev, paths in per_cell.items() if sev > 0 for p in paths]
        if corrupted:
            outcomes["all"] = pooled_outcomes(corrupted)
    return pd.DataFrame(rows)


def pooled_outcomes(paths: Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """The per-image outcomes of several cells (corrupted versions of the same test images, in the same order)
    pooled per image: every task's outcomes become a per-image confusion matrix summed over the cells
    (``<task>_confusion``, (N, K, K)), so a bootstrap that resamples images takes all corrupted versions of each."""
    pooled: dict[str, np.ndarray] = {}
    for path in paths:
        arrays = read_per_image(Path(path).parent, name=Path(path).name)
        if "path" not in pooled:
            pooled["path"] = np.array([Path(p).name for p in arrays["path"]])
        for key in [k for k in arrays if k.endswith("_pred")]:
            task = key[:-len("_pred")]
            k = arrays[f"{task}_prob"].shape[1]
            conf = np.zeros((len(arrays[key]), k, k), np.int64)
            conf[np.arange(len(conf)), arrays[f"{task}_true"].astype(int), arrays[key].astype(int)] = 1
            pooled[f"{task}_confusion"] = pooled.get(f"{task}_confusion", 0) + conf
        for key in [k for k in arrays if k.endswith("_confusion")]:
            pooled[key] = pooled.get(key, 0) + arrays[key]
    return pooled


_PROVENANCE = ("device", "deterministic", "library_version", "git_commit", "git_dirty", "python_version", "platform",
               "torch_version", "cuda_version", "cudnn_version", "gpu_name")


def _identity(net, run: Path | None) -> dict:
    """The schema's model fields of a row: from the model's options and, for a run folder, its run config."""
    out: dict = {}
    options, cfg = getattr(net, "config", None), getattr(net, "run_config", None)
    if hasattr(options, "backbone") and hasattr(options, "arch"):  # a ModelConfig
        out.update(backbone=options.backbone, arch=options.arch, sma=bool(options.sma), model_label=options.label,
                   paper_backbone=options.paper_backbone, connector=options.connector or "none")
    if cfg is not None:
        out.update(weighting=cfg.weighting, cls_loss=cfg.cls_loss, preset=cfg.preset, epochs=cfg.epochs,
                   config_hash=cfg.results_hash())
    if run is not None:
        out["run_dir"] = str(run)
    return out


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


def _run_config(run: Path) -> dict:
    path = run / "config.json"
    if not path.is_file():
        raise ValueError(f"model={str(run)!r}: not a run folder (no config.json; pass fit()'s run_dir)")
    return json.loads(path.read_text())


def _read_cache(path: Path, key: dict) -> dict | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # compare through JSON so tuples / lists and int / str keys read back alike
    return entry if entry.get("key") == json.loads(json.dumps(key, default=str)) else None


def _evaluate_cell(net, cell: Path, dataset: str, image_size: int, tasks, device, batch_size: int, id_map,
                   ignore_index: int, distances: bool, amp: str) -> dict:
    data = MTLDataset(cell, "test", dataset=dataset, image_size=image_size, id_map=id_map,
                      ignore_index=ignore_index)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    start = time.perf_counter()
    ev = evaluate(net, loader, device, tasks, spec=data.spec, distances=distances, amp=amp,
                  ignore_index=ignore_index, compat_size=COMPAT_SIZE, per_image_arrays=True)
    metrics = dict(ev)
    if not distances:  # not computed: leave the NaN placeholders out of the rows
        metrics = {k: v for k, v in metrics.items() if not metric_info(k)[1].needs_distances}
    return ({"data": "synthetic" if data.synthetic else "real", "n_images": len(data), "metrics": metrics,
             "seconds": round(time.perf_counter() - start, 3),
             "provenance": {**provenance(device), "device": str(device),
                            "deterministic": torch.are_deterministic_algorithms_enabled()}}, ev.arrays)
