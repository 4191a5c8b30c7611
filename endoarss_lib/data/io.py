"""Reading images and index masks from disk with errors that name the file, and atomic writes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_SUFFIXES", "MASK_SUFFIX", "read_image", "read_index_mask", "map_mask_ids",
           "image_size_of"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIX = ".png"  # masks must be lossless
# PIL modes that hold one integer per pixel: grey ('L'), palette indices ('P': the index is the id, not the colour),
# 16/32-bit integer ('I;16', 'I').
_INDEX_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file and what was expected."""


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    return img


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3)."""
    img = _open(Path(path))
    return np.asarray(img.convert("RGB"))


def read_index_mask(path: str | os.PathLike) -> np.ndarray:
    """A single-channel index mask as int64 (H, W); refuses colour masks, whose luminance would give wrong ids."""
    path = Path(path)
    img = _open(path)
    if img.mode not in _INDEX_MODES:
        raise DataError(
            f"{path}: mask has mode {img.mode!r} (colour); expected a single-channel index PNG (mode 'L', 'P' or "
            f"'I;16') whose pixel values are class ids. Convert colour-coded masks with an explicit palette first "
            f"(python -m endoarss_lib.data.prepare colour-masks --help).")
    return np.asarray(img).astype(np.int64)


def map_mask_ids(raw: np.ndarray, id_map: Mapping[int, int], path: str | os.PathLike) -> np.ndarray:
    """Raw mask values to train ids through ``id_map``; a value outside the map is an error naming the file."""
    present = np.unique(raw)
    unknown = [int(v) for v in present if int(v) not in id_map]
    if unknown:
        raise DataError(f"{path}: mask values {unknown} are not in the raw-to-train id map "
                        f"(known raw values: {sorted(id_map)}); pass id_map= or fix the mask")
    lut = np.zeros(int(present.max()) + 1, dtype=np.int64)
    for raw_id, train_id in id_map.items():
        if raw_id < lut.size:
            lut[raw_id] = train_id
    return lut[raw]
