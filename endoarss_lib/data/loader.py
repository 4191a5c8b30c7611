"""Loaders and fingerprints of datasets: the one public way to batch a dataset and to identify its contents.

:func:`make_loader` gives a DataLoader whose order depends only on ``(seed, epoch)``: a fresh generator per epoch, so
a resumed run sees exactly the batches an uninterrupted one would, and every worker is seeded from it.
:func:`fingerprint` hashes a dataset's files (names, sizes and bytes) and its side files (card, id map), so a run can
tell when the data it was trained or evaluated on has changed.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["make_loader", "seed_worker", "fingerprint", "file_digest"]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: NumPy and Python seeds from the torch seed the loader gave the worker."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, num_workers: int = 0,
                world: int = 1, rank: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` seeded by ``(seed, epoch)``; with ``world > 1`` and ``shuffle`` a
    DistributedSampler gives this ``rank`` its share."""
    generator = torch.Generator().manual_seed(seed * 10_007 + epoch)
    sampler = None
    if world > 1 and shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, worker_init_fn=seed_worker, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time within the process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# JSON files beside the data that no loader reads: ``validate`` writes index.json, so it must not make a run's data
# look changed.
_NOT_FINGERPRINTED = ("index.json",)


def fingerprint(root: str | os.PathLike, files: Iterable[str | os.PathLike]) -> str:
    """Content hash of ``files`` (relative names and bytes) and of the root's JSON side files (card, id map; not
    the ``index.json`` that ``validate`` writes)."""
    root = Path(root)
    digest = hashlib.sha256()
    rels = sorted({Path(p).resolve().relative_to(root.resolve()) if Path(p).is_absolute() else Path(p)
                   for p in files})
    rels += sorted(p.relative_to(root) for p in root.glob("*.json")
                   if not p.name.startswith(".") and p.name not in _NOT_FINGERPRINTED)
    for rel in rels:
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(file_digest(root / rel).encode())
    return digest.hexdigest()
