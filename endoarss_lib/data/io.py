"""Reading images and index masks from disk with errors that name the file, and where generated data go."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_SUFFIXES", "MASK_SUFFIX", "read_image", "read_index_mask", "map_mask_ids",
           "image_size_of", "to_rgb8", "describe_mode", "VALIDATE_HINT", "data_home"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIX = ".png"  # masks must be lossless
# PIL modes that hold one integer per pixel: grey ('L'), palette indices ('P': the index is the id, not the colour),
# 16/32-bit integer ('I;16', 'I').
_INDEX_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")
# 16-bit (and 32-bit integer) single-channel images: scaled to 8 bit, never clipped (PIL's convert("RGB") clips).
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MODE_WORDS = {"1": "1-bit black and white", "L": "8-bit grey", "P": "palette", "LA": "grey with alpha",
               "PA": "palette with alpha", "RGB": "colour", "RGBA": "colour with alpha", "RGBX": "colour",
               "CMYK": "colour (CMYK)", "YCbCr": "colour (YCbCr)", "LAB": "colour (Lab)", "HSV": "colour (HSV)",
               "I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit grey", "I;16B": "16-bit grey",
               "I;16L": "16-bit grey", "I;16N": "16-bit grey"}
VALIDATE_HINT = "python -m endoarss_lib.data.prepare validate ROOT --dataset NAME lists every such file in one pass"


def data_home() -> Path:
    """Where generated data go: ``$ENDOARSS_DATA``, else a per-user cache (``$XDG_CACHE_HOME/endoarss/data``, by
    default ``~/.cache/endoarss/data``), never inside the installed package."""
    if os.environ.get("ENDOARSS_DATA"):
        return Path(os.environ["ENDOARSS_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "endoarss" / "data"


class DataError(ValueError):
    """A problem with the data on disk; the message names the file and what was expected."""


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}): the file is damaged, truncated or not an image. "
                        f"Export it again (or remove it together with its image / mask); {VALIDATE_HINT}") from None
    return img


def describe_mode(mode: str) -> str:
    """Human wording of a PIL image mode: ``'RGB'`` -> ``"'RGB' (colour)"``."""
    return f"{mode!r} ({_MODE_WORDS.get(mode, 'an unusual mode')})"


def to_rgb8(img: Image.Image, path: str | os.PathLike = "") -> np.ndarray:
    """An opened image as uint8 (H, W, 3).

    16-bit grey (``I;16``, and ``I`` holding values in 0..65535) is scaled to 8 bit by ``round(v / 257)`` (65535 ->
    255, exact for 8-bit values stored as 16 bit); PIL's own conversion would clip every value above 255 to white.
    Values outside 0..65535 and float images (``F``) are refused: there is no safe rule for them.
    """
    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise DataError(f"{path}: image has mode {describe_mode(img.mode)} with values {int(wide.min())}.."
                            f"{int(wide.max())}, outside 16 bit; expected 8-bit RGB or grey (or 16-bit grey, which "
                            f"is scaled by 1/257). Convert it to 8-bit PNG first")
        grey = np.rint(wide / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        raise DataError(f"{path}: image has mode {describe_mode(img.mode)}; expected an 8-bit RGB or grey image (or "
                        f"16-bit grey). Convert it to 8-bit PNG first: no scaling of float pixels is guessed")
    return np.asarray(img.convert("RGB"))


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}): the file is damaged or not an image") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3); 16-bit grey is scaled to 8 bit (:func:`to_rgb8`), never clipped."""
    img = _open(Path(path))
    return to_rgb8(img, path)


def read_index_mask(path: str | os.PathLike) -> np.ndarray:
    """A single-channel index mask as int64 (H, W); refuses colour masks, whose luminance would give wrong ids."""
    path = Path(path)
    img = _open(path)
    if img.mode == "1":
        raise DataError(
            f"{path}: mask has mode {describe_mode(img.mode)}; expected a single-channel index PNG (mode 'L', 'P' or "
            f"'I;16') whose pixel values are class ids. A 1-bit mask says only foreground / background, not which "
            f"class: save it as mode 'L' with the foreground's class id as its pixel value.")
    if img.mode not in _INDEX_MODES:
        raise DataError(
            f"{path}: mask has mode {describe_mode(img.mode)}; expected a single-channel index PNG (mode 'L', 'P' or "
            f"'I;16') whose pixel values are class ids. Convert colour-coded masks with an explicit palette first "
            f"(python -m endoarss_lib.data.prepare colour-masks --help).")
    return np.asarray(img).astype(np.int64)


def map_mask_ids(raw: np.ndarray, id_map: Mapping[int, int], path: str | os.PathLike) -> np.ndarray:
    """Raw mask values to train ids through ``id_map``; a value outside the map is an error naming the file."""
    present = np.unique(raw)
    unknown = [int(v) for v in present if int(v) not in id_map]
    if unknown:
        raise DataError(f"{path}: mask values {unknown} are not in the raw-to-train id map "
                        f"(known raw values: {sorted(id_map)}); fix the mask, or give the map: id_map= ('released' "
                        f"for 1-based masks) or an id_map.json {{\"raw_to_train\": {{\"<raw>\": <train id>}}}} "
                        f"beside the data")
    lut = np.zeros(int(present.max()) + 1, dtype=np.int64)
    for raw_id, train_id in id_map.items():
        if raw_id < lut.size:
            lut[raw_id] = train_id
    return lut[raw]
