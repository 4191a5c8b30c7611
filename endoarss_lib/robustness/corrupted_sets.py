"""Whole corrupted test sets, cached on disk and built in parallel: every (corruption, severity) cell of a split.

:func:`build_corrupted_set` writes ``out_dir/<name>/<severity>`` as dataset roots (the split's layout, images as
PNG; masks copied for photometric corruptions, warped with the image for geometric ones) using the pixel transforms
of :mod:`endoarss_lib.robustness.corruptions`; :func:`clean_cell` writes the clean split through the very same
resize-and-PNG path, so clean and corrupted rows differ only by the corruption. A cell is reused only when its marker
(``_DONE.json``, written last) holds the current key: dataset content, split, corruption, severity, seed, size and
the generator / package versions.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from io import BytesIO
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import copy_atomic, remove_stale_temporaries, write_bytes_atomic
from ..data.io import IMAGE_SUFFIXES, DataError
from ..version import __version__
from .corruptions import (CORRUPTIONS, GENERATOR_VERSION, GEOMETRIC, MIN_SIDE, SEVERITIES, check_name,
                          check_seed, check_severity, corrupt, package_version)

__all__ = ["build_corrupted_set", "clean_cell", "cell_key", "image_seed", "list_split", "split_fingerprint",
           "DONE_NAME", "CLEAN"]

CLEAN = "clean"  # the corruption name of the clean reference cell (severity 0)


# ------------------------------------------------------------------------------------- corrupted-set builder

DONE_NAME = "_DONE.json"  # per (corruption, severity) folder; written last, holds the cache key


def build_corrupted_set(root: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "test",
                        names: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES, seed: int = 0,
                        image_size: int | tuple[int, int] | None = None, workers: int = 2, chunksize: int = 8,
                        progress: bool = True) -> dict[tuple[str, int], Path]:
    """Write every corrupted cell ``out_dir/<name>/<severity>`` as a dataset root; return {(name, severity): root}.

    Reads ``root/<split>/<activity>/image/*`` (+ ``mask/<stem>.png``) and writes the same layout under each cell,
    images as PNG; masks are copied (photometric) or warped (geometric). ``image_size`` resizes first (bilinear;
    masks nearest) to corrupt at the evaluation resolution. A cell whose ``_DONE.json`` holds the current key
    (dataset content, split, corruption, severity, seed, size, versions) is skipped; any other cell is rebuilt.
    Workers are processes started from a fresh server (forkserver): a script must call this under
    ``if __name__ == '__main__':``; notebooks need nothing.
    """
    for name in names:
        check_name(name)
    for severity in severities:
        check_severity(severity)
    check_seed(seed)
    for label, value in (("workers", workers), ("chunksize", chunksize)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}={value!r}: expected an integer >= 1")
    root, out_dir = Path(root), Path(out_dir)
    if out_dir.resolve().is_relative_to((root / split).resolve()):
        raise ValueError(f"out_dir={str(out_dir)!r}: must not lie inside the split it corrupts ({root / split})")
    size = _check_size(image_size)
    samples = list_split(root, split)
    fingerprint = split_fingerprint(root, samples)
    cells, jobs = {}, []
    for name in names:
        for severity in severities:
            cell = out_dir / name / str(severity)
            cells[(name, int(severity))] = cell
            key = cell_key(fingerprint, split, name, int(severity), seed, size)
            if not _is_done(cell, key):
                _reset_cell(cell, root)
                jobs += _cell_jobs(root, cell, key, samples, chunksize)
            else:
                remove_stale_temporaries(cell, recursive=True)  # a killed write's leftovers; a live one's are kept
    _run_jobs(jobs, workers, progress)
    return cells


def cell_key(fingerprint: str, split: str, name: str, severity: int, seed: int,
             size: tuple[int, int] | None) -> dict:
    """What a corrupted cell depends on; a cell on disk is reused only when its marker holds this exact key."""
    return {"dataset": fingerprint, "split": split, "corruption": name, "severity": severity, "seed": int(seed),
            "image_size": None if size is None else list(size), "generator_version": GENERATOR_VERSION,
            "endoarss_lib": __version__, "imagecorruptions": package_version()}


def _check_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= MIN_SIDE for s in size):
        raise ValueError(f"image_size={image_size!r}: expected None, an int or (height, width), each >= {MIN_SIDE}")
    return int(size[0]), int(size[1])


def list_split(root: Path, split: str) -> list[tuple[Path, Path | None]]:
    """Sorted (image, mask or None) paths relative to ``root`` for ``root/<split>/<activity>/image/*``."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder missing (expected <root>/{split}/<activity>/image/*.png)")
    samples = []
    for activity in sorted((p for p in split_dir.iterdir() if p.is_dir()), key=_folder_order):
        image_dir, mask_dir = activity / "image", activity / "mask"
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: missing image folder")
        for image in sorted(p for p in image_dir.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
            mask = mask_dir / f"{image.stem}.png"
            if mask_dir.is_dir() and not mask.is_file():
                raise DataError(f"{image}: no mask {mask}")
            samples.append((image.relative_to(root), mask.relative_to(root) if mask.is_file() else None))
    if not samples:
        raise DataError(f"{split_dir}: no images")
    return samples


def _folder_order(path: Path) -> tuple:
    """Activity folders '1' .. 'K' in numeric order, any other names after them."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def split_fingerprint(root: Path, samples: list[tuple[Path, Path | None]]) -> str:
    """Content hash of the split (names and bytes) and of the root's JSON side files (card, id map)."""
    digest = hashlib.sha256()
    files = [p for pair in samples for p in pair if p is not None] + sorted(p.relative_to(root)
                                                                             for p in root.glob("*.json"))
    for rel in files:
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return digest.hexdigest()


def _is_done(cell: Path, key: dict) -> bool:
    try:
        return json.loads((cell / DONE_NAME).read_text()).get("key") == key
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _reset_cell(cell: Path, root: Path) -> None:
    """Empty a stale or partial cell (marker first) and copy the root's JSON side files so loaders read it alike."""
    (cell / DONE_NAME).unlink(missing_ok=True)
    if cell.exists():
        shutil.rmtree(cell)
    cell.mkdir(parents=True)
    for side in sorted(root.glob("*.json")):
        shutil.copyfile(side, cell / side.name)


def _cell_jobs(root: Path, cell: Path, key: dict, samples: list, chunksize: int) -> list[dict]:
    """Chunks of (image index, image, mask) for one cell; the index feeds the per-image seed."""
    indexed = list(enumerate(samples))
    return [dict(root=root, cell=cell, key=key, items=indexed[i:i + chunksize])
            for i in range(0, len(indexed), chunksize)]


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> None:
    """Run the chunks (in-process for one worker), writing each cell's marker when its last chunk is done."""
    total, keys = {}, {}
    for job in jobs:
        total[job["cell"]] = total.get(job["cell"], 0) + len(job["items"])
        keys[job["cell"]] = job["key"]
    left = dict(total)
    with tqdm(total=sum(total.values()), desc="corrupting", unit="img", disable=not progress) as bar:
        for cell, n in _completed(jobs, workers):
            bar.update(n)
            left[cell] -= n
            if left[cell] == 0:  # the marker goes last: a cell without it is never trusted
                marker = {"key": keys[cell], "images": total[cell], "finished": time.time()}
                _write_atomic(cell / DONE_NAME, json.dumps(marker, indent=2).encode())


def _completed(jobs: list[dict], workers: int) -> Iterator[tuple[Path, int]]:
    """(cell, images written) per finished chunk; the first failure cancels the chunks not yet started."""
    if workers == 1 or len(jobs) <= 1:
        yield from map(_process_chunk, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_init_worker) as pool:
        futures = [pool.submit(_process_chunk, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a corruption worker died. Workers start by importing the caller's main module: in a script, call "
                "build_corrupted_set under `if __name__ == '__main__':`, or pass workers=1") from exc
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _init_worker() -> None:
    """One OpenCV thread per worker: the pool already fills the cores (safe here: the worker was not forked from a
    process whose OpenCV pool was running, which deadlocks this very call)."""
    cv2.setNumThreads(1)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fresh server, not from the caller: a child forked from a process whose OpenCV (or
    OpenMP) thread pool is running deadlocks on that pool's locks."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "endoarss_lib.robustness.corruptions"])  # import cv2, scipy, skimage once in the server, not per worker
    return context


def _process_chunk(job: dict) -> tuple[Path, int]:
    """Corrupt and write the chunk's images (and masks) into its cell."""
    key, cell, root = job["key"], job["cell"], job["root"]
    for index, (image_rel, mask_rel) in job["items"]:
        try:
            _process_one(root, cell, key, index, image_rel, mask_rel)
        except Exception as exc:
            raise RuntimeError(f"{root / image_rel}: {key['corruption']} severity {key['severity']} failed: "
                               f"{exc}") from exc
    return cell, len(job["items"])


def image_seed(seed: int, name: str, index: int) -> int:
    """Seed of image ``index`` in a corrupted set: independent of the worker count and shared across severities."""
    return int(np.random.SeedSequence([int(seed), CORRUPTIONS.index(name), int(index)]).generate_state(1)[0])


def _process_one(root: Path, cell: Path, key: dict, index: int, image_rel: Path, mask_rel: Path | None) -> None:
    name, size = key["corruption"], key["image_size"]
    # PIL directly, not data.io, whose package import pulls torch into every worker; _process_chunk names the file
    image = np.asarray(_resize(Image.open(root / image_rel).convert("RGB"), size, Image.BILINEAR))
    seed = image_seed(key["seed"], name, index)
    moves_mask = name in GEOMETRIC or size is not None
    if mask_rel is None:
        out, mask = corrupt(image, name, key["severity"], seed), None
    elif not moves_mask:
        out, mask = corrupt(image, name, key["severity"], seed), None
        _copy_atomic(root / mask_rel, cell / mask_rel)  # byte-identical truth
    else:
        source = Image.open(root / mask_rel)
        raw = np.asarray(_resize(source, size, Image.NEAREST))
        out, mask = corrupt(image, name, key["severity"], seed, mask=raw)
        _write_atomic(cell / mask_rel, _png_bytes(_like(mask, source)))
    _write_atomic((cell / image_rel).with_suffix(".png"), _png_bytes(Image.fromarray(out)))


def _resize(img: Image.Image, size: list | None, resample: int) -> Image.Image:
    """To (height, width) = size; PIL's bilinear antialiases when shrinking, like torchvision's antialias=True."""
    if size is None or img.size == (size[1], size[0]):
        return img
    return img.resize((size[1], size[0]), resample)


def _like(mask: np.ndarray, source: Image.Image) -> Image.Image:
    """A mask array as an image of the source's kind (a palette mask keeps its palette)."""
    out = Image.fromarray(mask)
    if source.mode == "P" and out.mode == "L":
        out.putpalette(source.getpalette())
    return out


def _png_bytes(img: Image.Image) -> bytes:
    buffer = BytesIO()
    img.save(buffer, format="PNG", compress_level=1)  # 2-4x faster to write than the default 6, ~10 % larger
    return buffer.getvalue()


_write_atomic = write_bytes_atomic
_copy_atomic = copy_atomic


def clean_cell(root: str | os.PathLike, cells_dir: str | os.PathLike, image_size: int, split: str = "test") -> Path:
    """The clean split through the corrupted cells' exact path (PIL resize to the evaluation size, PNG), written to
    ``cells_dir/clean/0`` (cached by the same kind of key), so clean and corrupted rows differ only by the
    corruption."""
    root, cells_dir = Path(root), Path(cells_dir)
    size = (image_size, image_size)
    samples = list_split(root, split)
    key = cell_key(split_fingerprint(root, samples), split, CLEAN, 0, 0, size)
    cell = cells_dir / CLEAN / "0"
    if _is_done(cell, key):
        remove_stale_temporaries(cell, recursive=True)
        return cell
    _reset_cell(cell, root)
    for image_rel, mask_rel in samples:
        image = _resize(Image.open(root / image_rel).convert("RGB"), list(size), Image.BILINEAR)
        write_bytes_atomic((cell / image_rel).with_suffix(".png"), _png_bytes(image))
        if mask_rel is not None:
            source = Image.open(root / mask_rel)
            if source.size == (size[1], size[0]):
                copy_atomic(root / mask_rel, cell / mask_rel)
            else:
                mask = np.asarray(_resize(source, list(size), Image.NEAREST))
                write_bytes_atomic(cell / mask_rel, _png_bytes(_like(mask, source)))
    marker = {"key": key, "images": len(samples), "finished": time.time()}
    write_bytes_atomic(cell / DONE_NAME, json.dumps(marker, indent=2).encode())
    return cell
