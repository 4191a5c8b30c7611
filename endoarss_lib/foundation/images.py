"""The unlabelled image pool: synthetic endoscopic images rendered once into memory, with seeds disjoint from every
dataset image the notebooks and tests draw (:func:`pretrain_rng`); no label or mask is ever read."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.synthetic import _PRESET_IDS, preset_activities, render_sample
from .recipe import PRETRAIN_TAG, PretrainConfig

__all__ = ["pretrain_rng", "render_pool"]


def pretrain_rng(seed: int, preset: str, index: int) -> np.random.Generator:
    """Generator of pretraining image ``index`` of ``preset`` (disjoint from every dataset image's generator)."""
    return np.random.default_rng(np.random.SeedSequence([PRETRAIN_TAG, int(seed), _PRESET_IDS[preset], int(index)]))


def _render_chunk(args) -> np.ndarray:
    seed, preset, start, stop, size = args
    out = np.empty((stop - start, size, size, 3), np.uint8)
    names = preset_activities(preset)
    for j, i in enumerate(range(start, stop)):
        rng = pretrain_rng(seed, preset, i)
        activity = names[int(rng.integers(len(names)))]
        out[j] = render_sample(preset, activity, rng, image_size=size)[0]  # the mask is never used
    return out


def render_pool(cfg: PretrainConfig, workers: int = 1, progress: bool = True) -> torch.Tensor:
    """The unlabelled pool: (N, 3, S, S) uint8, ``pool_size`` images split evenly over ``cfg.presets``."""
    per = [cfg.pool_size // len(cfg.presets) + (i < cfg.pool_size % len(cfg.presets))
           for i in range(len(cfg.presets))]
    jobs = []
    for preset, n in zip(cfg.presets, per):
        for start in range(0, n, 250):
            jobs.append((cfg.data_seed, preset, start, min(n, start + 250), cfg.render_size))
    bar = tqdm(total=cfg.pool_size, desc="render pretraining images", disable=not progress)
    chunks = []
    if workers > 1:
        with mp.get_context("forkserver").Pool(workers) as pool:
            for arr in pool.imap(_render_chunk, jobs):
                chunks.append(arr)
                bar.update(len(arr))
    else:
        for job in jobs:
            chunks.append(_render_chunk(job))
            bar.update(len(chunks[-1]))
    bar.close()
    return torch.from_numpy(np.concatenate(chunks)).permute(0, 3, 1, 2).contiguous()
