"""Decoded-image cache: a split's images and train-id masks decoded once into memory-mapped files.

Without a cache every epoch decodes every PNG again (a 1280 x 1024 EndoVis frame takes tens of milliseconds), which
starves a GPU. :func:`open_cache` builds a cache of an :class:`~endoarss_lib.data.MTLDataset` once (with a progress
bar) and opens it; :meth:`MTLDataset.use_cache` then reads every item from it. What is stored is chosen so that an
item is **bitwise** the one read without the cache (``tests/test_data_cache.py`` checks items and whole runs):

* ``augment=False`` (validation, test, and training in the ``paper`` / ``released`` presets): the image and mask
  **at the model size**, resized (or letterboxed) exactly as :meth:`JointTransform.geometry` does it. The resized
  image is uint8 in the uncached pipeline too, so an item is a copy, a division by 255 and the normalisation.
* ``augment=True``: the random crop is taken from the **full-size** frame and only then resized, so caching resized
  frames would change what augmentation produces. The cache holds the decoded full-size arrays (the decoding is
  saved; the crop and its resize are done per item, as without the cache).

Layout: ``<cache dir>/<dataset>-<split>-<size>px-<resize mode>-<digest>/`` (or ``...-full-<digest>``) holding
``images.u8`` (every image's H x W x 3 bytes, one after the other), ``masks.bin`` (train ids, uint8 when every id and
the ignore index fit, else int32), ``index.npy`` (per item: image offset, height, width, mask offset) and
``meta.json`` (the key, the item count, the mask dtype, the files in order). The digest is the sha256 of the key:
the data's content fingerprint (:meth:`MTLDataset.fingerprint`: every file's bytes and the side files), the cache
kind, the image size, resize mode and ignore index (resized caches), the raw-to-train id map, this cache format and
the versions of endoarss, torch, torchvision and Pillow (decoding and resizing). Changed data, another size or
another library version get a new folder; old folders are never reused for them (remove them yourself to free the disk).

A cache is built into a hidden temporary folder beside its final one and renamed into place when complete, under a
file lock, so concurrent builders (``torchrun`` ranks, sweep jobs) build it once and no reader sees half of one. The
cache directory is the data home's ``cache`` folder by default (:func:`default_cache_dir`), never inside the package.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
import torch
import torchvision
from tqdm.auto import tqdm

from ..version import __version__
from .io import DataError, data_home, image_size_of

__all__ = ["ImageCache", "open_cache", "cache_key", "cache_folder", "default_cache_dir", "CACHE_FORMAT"]

CACHE_FORMAT = 1  # bump when the layout or what is stored changes
META, INDEX, IMAGES, MASKS = "meta.json", "index.npy", "images.u8", "masks.bin"


def default_cache_dir() -> Path:
    """``<data home>/cache`` (``$ENDOARSS_DATA/cache``, else ``~/.cache/endoarss/data/cache``)."""
    return data_home() / "cache"


def _checked_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache directory to use; ValueError if it lies inside the installed package."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    resolved, package = path.resolve(), Path(__file__).resolve().parents[1]
    if resolved == package or package in resolved.parents:
        raise ValueError(f"cache_dir={str(path)!r} is inside the installed package ({package}); choose a folder "
                         f"outside it (default: {default_cache_dir()})")
    return path


def _kind(dataset) -> str:
    """'full' (decoded full-size arrays, for augmentation) or 'resized' (arrays at the model size)."""
    return "full" if dataset.transform.augment else "resized"


def cache_key(dataset) -> dict:
    """Everything the cached arrays of ``dataset`` depend on (see the module docstring)."""
    t = dataset.transform
    key = {"format": CACHE_FORMAT, "endoarss": __version__, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "pillow": PIL.__version__, "fingerprint": dataset.fingerprint(),
           "kind": _kind(dataset), "id_map": sorted([int(k), int(v)] for k, v in dataset.id_map.items())}
    if key["kind"] == "resized":
        key.update(image_size=int(t.size), resize_mode=t.resize_mode, ignore_index=int(t.ignore_index))
    elif int(t.ignore_index) != 255:  # raw mask values equal to it are kept as "ignore" (the default keeps old keys)
        key["ignore_index"] = int(t.ignore_index)
    return key


def cache_folder(dataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of ``dataset``'s cache under ``cache_dir`` (built or not)."""
    key = cache_key(dataset)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tag = f"{key['image_size']}px-{key['resize_mode']}" if key["kind"] == "resized" else "full"
    return _checked_dir(cache_dir) / f"{dataset.spec.name}-{dataset.split}-{tag}-{digest}"


def _mask_dtype(dataset) -> np.dtype:
    """uint8 when every train id and the ignore index fit in 0..255, else int32."""
    values = [int(v) for v in dataset.id_map.values()] + [int(dataset.transform.ignore_index)]
    return np.dtype(np.uint8) if min(values) >= 0 and max(values) <= 255 else np.dtype(np.int32)


def _item(dataset, index: int, resized: bool) -> tuple[np.ndarray, np.ndarray]:
    """What the cache stores for one item: the decoded arrays, resized as the uncached pipeline resizes them."""
    image, mask = dataset.load_raw(index)
    if not resized:
        return image, mask
    image_t, mask_t = dataset.transform.geometry(torch.from_numpy(image.copy()).permute(2, 0, 1),
                                                 torch.from_numpy(mask)[None])
    return image_t.permute(1, 2, 0).numpy(), mask_t[0].numpy()


def _shapes(dataset, resized: bool) -> list[tuple[int, int]]:
    """(height, width) of every stored item: the model size, or each file's size read from its header."""
    if resized:
        return [(dataset.transform.size, dataset.transform.size)] * len(dataset)
    return [image_size_of(s.image)[::-1] for s in dataset.samples]


def _index(shapes: list[tuple[int, int]]) -> np.ndarray:
    pixels = np.array([h * w for h, w in shapes], dtype=np.int64)
    mask_offsets = np.concatenate([[0], np.cumsum(pixels)[:-1]]).astype(np.int64)
    heights, widths = (np.array(v, dtype=np.int64) for v in zip(*shapes))
    return np.stack([3 * mask_offsets, heights, widths, mask_offsets], axis=1)


def _fill(dataset, folder: Path, index: np.ndarray, dtype: np.dtype, resized: bool, progress: bool) -> None:
    """Decode every item into the memory-mapped files of ``folder``."""
    pixels = int((index[:, 1] * index[:, 2]).sum())
    images = np.memmap(folder / IMAGES, np.uint8, "w+", shape=(3 * pixels,))
    masks = np.memmap(folder / MASKS, dtype, "w+", shape=(pixels,))
    label = f"{dataset.transform.size}px" if resized else "full size"
    for i in tqdm(range(len(dataset)), desc=f"caching {dataset.spec.name} {dataset.split} ({label})", unit="img",
                  disable=not progress):
        image, mask = _item(dataset, i, resized)
        offset, h, w, mask_offset = (int(v) for v in index[i])
        if image.shape != (h, w, 3):
            raise DataError(f"{dataset.samples[i].image}: decoded as {image.shape[1]}x{image.shape[0]}, but its "
                            f"header says {w}x{h}; re-export the file")
        images[offset:offset + 3 * h * w] = image.reshape(-1)
        masks[mask_offset:mask_offset + h * w] = mask.reshape(-1)
    images.flush()
    masks.flush()
    del images, masks


def _build(dataset, final: Path, key: dict, progress: bool) -> None:
    """Build the cache in a hidden temporary folder beside ``final`` and rename it into place."""
    resized = key["kind"] == "resized"
    index, dtype = _index(_shapes(dataset, resized)), _mask_dtype(dataset)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.building")
    tmp.mkdir(parents=True)
    try:
        _fill(dataset, tmp, index, dtype, resized, progress)
        np.save(tmp / INDEX, index)
        files = [str(s.image.relative_to(dataset.root)) for s in dataset.samples]
        (tmp / META).write_text(json.dumps({"key": key, "items": len(dataset), "mask_dtype": dtype.name,
                                            "files": files}, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META).is_file():  # not another builder's complete cache: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _lock(final: Path) -> Iterator[None]:
    """An exclusive lock on ``final``'s build (fcntl; where it does not exist, builders may race harmlessly)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: two builders both build, the second rename loses and its copy is dropped
        yield
        return
    with open(final.with_name(f".{final.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ImageCache:
    """The read side of a built cache: ``get(i)`` -> (uint8 H x W x 3 image, int64 H x W train-id mask).

    The files are memory-mapped on first use in each process (DataLoader workers open their own maps; pickling
    drops them), so the operating system's page cache serves every worker and epoch from one copy.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / META).read_text())
            self.index = np.load(self.folder / INDEX)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.folder}: damaged data cache ({exc}); open it with open_cache(), which moves a "
                            f"damaged cache aside and rebuilds it") from None
        self.resized = self.meta["key"]["kind"] == "resized"
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _open(self) -> None:
        self._images = np.memmap(self.folder / IMAGES, np.uint8, "r")
        self._masks = np.memmap(self.folder / MASKS, np.dtype(self.meta["mask_dtype"]), "r")

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as fresh (writable) arrays: image uint8 (H, W, 3), mask int64 (H, W)."""
        if self._images is None:
            self._open()
        offset, h, w, mask_offset = (int(v) for v in self.index[index])
        image = np.array(self._images[offset:offset + 3 * h * w]).reshape(h, w, 3)
        mask = self._masks[mask_offset:mask_offset + h * w].astype(np.int64).reshape(h, w)
        return image, mask

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_masks": None}

    def __repr__(self) -> str:
        kind = "model size" if self.resized else "full size"
        return f"ImageCache({len(self)} items, {kind}, {str(self.folder)!r})"


def _opened(final: Path, n_items: int) -> ImageCache | str:
    """The cache in folder ``final`` if it can serve a dataset of ``n_items`` items, else why not."""
    if not (final / META).is_file():
        return f"no {META} (not written by this library, or its build was interrupted)"
    try:
        cache = ImageCache(final)
    except DataError as exc:
        return str(exc)
    return cache if len(cache) == n_items else f"holds {len(cache)} items, the dataset has {n_items}"


def open_cache(dataset, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ImageCache:
    """The cache of ``dataset`` under ``cache_dir`` (default :func:`default_cache_dir`), built first if missing.

    A damaged folder in the cache's place (no ``meta.json``, unreadable index, another item count) is never used and
    never deleted: it is renamed to ``<name>.damaged-<id>`` beside it (a warning says where) and the cache is rebuilt.
    """
    final = cache_folder(dataset, cache_dir)
    cache = _opened(final, len(dataset))
    if isinstance(cache, ImageCache):
        return cache
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final):
        if final.exists():  # damaged, or built by another process while this one waited for the lock
            cache = _opened(final, len(dataset))
            if isinstance(cache, ImageCache):
                return cache
            aside = final.with_name(f"{final.name}.damaged-{uuid.uuid4().hex[:8]}")
            final.rename(aside)
            warnings.warn(f"{final}: damaged data cache ({cache}); moved to {aside} (kept for you to inspect) "
                          f"and rebuilt", stacklevel=2)
        for stale in final.parent.glob(f".{final.name}.*.building"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        _build(dataset, final, cache_key(dataset), progress)
    return ImageCache(final)
