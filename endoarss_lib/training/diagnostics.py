"""Task-conflict diagnostics on the trainable shared parameters: gradient cosine and magnitude similarity.

The paper says TESLA "mitigates gradient conflicts" but never measures it. These numbers do, per step and per
transformer block (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning", define both quantities).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Sequence

import pandas as pd
import torch

from ..weighting.task_grads import loss_roots, rows_matrix, task_gradients

__all__ = ["task_gradient_matrix", "pair_stats", "conflict_record", "block_of", "conflict_summary"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def block_of(name: str) -> str:
    """'block<i>' for a parameter inside transformer block i, else its top-level component."""
    match = _BLOCK.search(name)
    if match:
        return f"block{int(match.group(1)):02d}"
    return "sma" if ".sma." in f".{name}" else name.split(".")[0]


def task_gradient_matrix(losses: torch.Tensor | Sequence[torch.Tensor],
                         named_params: Iterable[tuple[str, torch.nn.Parameter]], mode: str | None = None
                         ) -> tuple[torch.Tensor, "OrderedDict[str, slice]"]:
    """(T, P) float32 gradients of each loss w.r.t. the given trainable parameters, and the column slice of every
    block. ``losses``: a 1-D tensor or a sequence of scalars; the graph is kept (the training step backpropagates
    afterwards). Computed by :func:`endoarss_lib.weighting.task_grads.task_gradients` (``mode``: its strategy)."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    params = [p for _, p in named]
    rows = task_gradients(losses, params, mode=mode, retain_graph=True)
    grads = rows_matrix(rows, params, dtype=torch.float32) if params else \
        torch.zeros(len(loss_roots(losses)), 0)
    slices: OrderedDict[str, slice] = OrderedDict()
    start = 0
    for name, p in named:
        key, end = block_of(name), start + p.numel()
        previous = slices.get(key)
        slices[key] = slice(previous.start if previous else start, end)  # parameters of a block are contiguous
        start = end
    return grads, slices


def pair_stats(g1: torch.Tensor, g2: torch.Tensor) -> dict[str, float]:
    """Cosine and magnitude similarity ``2|g1||g2| / (|g1|^2 + |g2|^2)`` of two gradients (NaN if one is zero)."""
    n1, n2 = g1.norm().item(), g2.norm().item()
    if n1 == 0.0 or n2 == 0.0:
        return {"cosine": float("nan"), "magnitude_similarity": float("nan"), "norm_0": n1, "norm_1": n2}
    return {"cosine": float(torch.dot(g1, g2) / (n1 * n2)),
            "magnitude_similarity": 2 * n1 * n2 / (n1 ** 2 + n2 ** 2), "norm_0": n1, "norm_1": n2}


def conflict_record(grads: torch.Tensor, slices: "OrderedDict[str, slice]") -> dict[str, float]:
    """One log row: overall and per-block stats of tasks 0 and 1 (the first two tasks)."""
    if grads.shape[0] < 2:
        raise ValueError("conflict diagnostics need at least two tasks")
    row = pair_stats(grads[0], grads[1])
    for block, cols in slices.items():
        stats = pair_stats(grads[0, cols], grads[1, cols])
        row[f"{block}/cosine"] = stats["cosine"]
        row[f"{block}/magnitude_similarity"] = stats["magnitude_similarity"]
    return row


def conflict_summary(diag, by: str = "model"):
    """Per group (``by``) of a ``diagnostics.csv`` frame (several runs concatenated, with ``seed``): logged steps,
    mean cosine and its std over seeds, share of conflicting steps (cosine < 0), mean magnitude similarity, the
    median norm ratio ``|g_seg| / |g_cls|`` (which task drives the shared update), and the first / last epoch's mean
    cosine. A pandas DataFrame, one row per group."""
    rows = []
    for name, d in diag.groupby(by, sort=False):
        first, last = d["epoch"].min(), d["epoch"].max()
        per_seed = d.groupby("seed")["cosine"].mean() if "seed" in d else pd.Series(dtype=float)
        rows.append({by: name, "logged steps": len(d), "mean cosine": d["cosine"].mean(),
                     "mean cosine, seed std": per_seed.std(ddof=1) if len(per_seed) > 1 else float("nan"),
                     "conflicting steps": (d["cosine"] < 0).mean(),
                     "mean magnitude similarity": d["magnitude_similarity"].mean(),
                     "median |g_seg|/|g_cls|": (d["norm_1"] / d["norm_0"]).median(),
                     "cosine, first epoch": d.loc[d["epoch"] == first, "cosine"].mean(),
                     "cosine, last epoch": d.loc[d["epoch"] == last, "cosine"].mean()})
    return pd.DataFrame(rows)
