"""Reading images and index masks from disk with errors that name the file, and where generated data go."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_SUFFIXES", "MASK_SUFFIX", "read_image", "read_index_mask", "map_mask_ids",
           "image_size_of", "to_rgb8", "describe_mode", "VALIDATE_HINT", "LOSSY_FORMATS", "shown_path",
           "data_home"]

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
# File formats (PIL's names, read from the file's own header, whatever its suffix) that store pixels lossily: a mask in
# one of them has changed class ids along every edge.
LOSSY_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG (MPO)", "JPEG2000": "JPEG 2000", "WEBP": "WebP"}


def shown_path(path: str | os.PathLike) -> str:
    """A path as messages show it: a file name that is not valid UTF-8 gets backslash escapes (printable, and
    still telling which file it is) instead of making the message itself unprintable."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
        raise DataError(f"{shown_path(path)}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{shown_path(path)}: the image is larger than PIL's safety limit against decompression bombs "
                        f"({exc}). If the file is genuine, downscale it (the model sees at most a few hundred pixels "
                        f"per side), or raise the limit with PIL.Image.MAX_IMAGE_PIXELS = <pixels> before loading; "
                        f"{VALIDATE_HINT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{shown_path(path)}: cannot decode image ({exc}): the file is damaged, truncated or not an "
                        f"image. "
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
    except Image.DecompressionBombError as exc:
        raise DataError(f"{shown_path(path)}: the image is larger than PIL's safety limit ({exc})") from None
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
    if img.format in LOSSY_FORMATS:
        raise DataError(
            f"{shown_path(path)}: the mask is a {LOSSY_FORMATS[img.format]} file (its header says so, whatever its "
            f"name): lossy compression changes class ids along every edge, so its pixel values are not the labels "
            f"that were drawn. Export the masks again as PNG from the original annotations (converting this file "
            f"would keep the damage); {VALIDATE_HINT}")
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


def map_mask_ids(raw: np.ndarray, id_map: Mapping[int, int], path: str | os.PathLike,
                 ignore_index: int | None = None) -> np.ndarray:
    """Raw mask values to train ids through ``id_map``; a raw value equal to ``ignore_index`` that the map does not
    name stays ``ignore_index`` (pixels no loss or metric counts, e.g. 255 "void" regions); any other value outside
    the map is an error naming the file."""
    present = np.unique(raw)
    unknown = [int(v) for v in present if int(v) not in id_map and int(v) != ignore_index]
    if unknown:
        ignore = (f"; a value that marks pixels to ignore is accepted when it equals ignore_index (now "
                  f"{ignore_index})" if ignore_index is not None else "")
        raise DataError(f"{shown_path(path)}: mask values {unknown} are not in the raw-to-train id map "
                        f"(known raw values: {sorted(id_map)}); fix the mask, or give the map: id_map= ('released' "
                        f"for 1-based masks) or an id_map.json {{\"raw_to_train\": {{\"<raw>\": <train id>}}}} "
                        f"beside the data{ignore}")
    if present.size and int(present.min()) < 0:
        raise DataError(f"{shown_path(path)}: negative mask values {[int(v) for v in present if v < 0]}; expected "
                        f"class ids >= 0")
    lut = np.zeros(int(present.max()) + 1 if present.size else 1, dtype=np.int64)
    if ignore_index is not None and 0 <= ignore_index < lut.size:
        lut[ignore_index] = ignore_index
    for raw_id, train_id in id_map.items():
        if 0 <= raw_id < lut.size:
            lut[raw_id] = train_id
    return lut[raw]
