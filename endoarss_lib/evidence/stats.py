"""Intervals and verdicts: per-seed paired differences with a t interval, and a bootstrap over test images.

A claim "``better`` beats ``worse`` on ``metric``" is decided from two intervals of the mean difference
(``better - worse``, signed so that positive is the claimed direction):

* **seeds**: the per-seed paired differences (same seed, same data, same test images), mean +- Student t quantile x
  standard error (n - 1 degrees of freedom): how much the result depends on the training run;
* **test images**: a bootstrap over the test images (the same resampled images for both sides when they were
  evaluated on the same images: paired), of the difference averaged over the seeds: how much it depends on which
  images happened to be in the test set.

``demonstrated`` when both intervals lie above 0, ``reversed`` when both lie below 0, ``inconclusive`` otherwise (and
always with fewer than 2 seeds). A metric that is not a function of test images (e.g. a gradient statistic) is
decided on the seed interval alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = ["t_interval", "bootstrap_interval", "verdict", "VERDICTS", "LEVEL", "N_BOOTSTRAP"]

LEVEL = 0.95
N_BOOTSTRAP = 2000
VERDICTS = ("demonstrated", "reversed", "inconclusive")


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student t interval of the mean of ``values`` (NaN bounds with fewer than 2 values
    or non-finite ones)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2 or not np.all(np.isfinite(v)):
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def bootstrap_interval(difference: Callable[[np.ndarray, np.ndarray], float], n_better: int, n_worse: int,
                       paired: bool, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = LEVEL
                       ) -> tuple[float, float]:
    """Percentile interval of ``difference(idx_better, idx_worse)`` over bootstrap resamples of the test images.

    ``paired``: both sides were evaluated on the same images (``n_better == n_worse``), so one resample serves both;
    otherwise each side's images are resampled independently. Resamples whose difference is undefined (NaN, e.g. a
    class absent from the resample) are dropped; NaN bounds when fewer than half remain.
    """
    if paired and n_better != n_worse:
        raise ValueError(f"paired bootstrap over different test sets ({n_better} vs {n_worse} images)")
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for i in range(n_boot):
        idx_b = rng.integers(0, n_better, n_better)
        idx_w = idx_b if paired else rng.integers(0, n_worse, n_worse)
        values[i] = difference(idx_b, idx_w)
    values = values[np.isfinite(values)]
    if values.size < n_boot / 2:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


def verdict(n_seeds: int, seed_low: float, seed_high: float, boot_low: float = float("nan"),
            boot_high: float = float("nan"), bootstrap: bool = True) -> str:
    """``demonstrated`` / ``reversed`` / ``inconclusive`` from the two intervals (see the module docstring);
    ``bootstrap=False``: the seed interval alone decides (a metric that is not a function of test images)."""
    if n_seeds < 2 or not (np.isfinite(seed_low) and np.isfinite(seed_high)):
        return "inconclusive"
    if bootstrap and not (np.isfinite(boot_low) and np.isfinite(boot_high)):
        return "inconclusive"
    lows = [seed_low] + ([boot_low] if bootstrap else [])
    highs = [seed_high] + ([boot_high] if bootstrap else [])
    if min(lows) > 0:
        return "demonstrated"
    if max(highs) < 0:
        return "reversed"
    return "inconclusive"
