"""Synthetic endoscopic scenes for activity recognition + segmentation, written in the on-disk layout of docs/data.md.

Each image comes from its own seeded generator, so it does not depend on how many others are drawn. Objects are
rasterised once as boolean masks that paint both the image and the train-id mask (pixel-aligned by construction).
The activity decides which instruments and context cues appear; look-alike class pairs (``LOOK_ALIKE_PAIRS``) are
drawn by the same code with the same parameter distributions, so only the activity context tells them apart: the
property EndoARSS is built on. All arithmetic is float64 numpy, so the rare last-bit differences between CPUs'
SIMD paths cannot flip a uint8 value in practice. Nothing here reproduces the paper's data or results.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from ..atomic import process_alive
from .registry import DATASETS, SYNTHETIC_PRESETS, DatasetSpec

__all__ = ["make_synthetic", "remove_stale_partials", "render_sample", "sample_rng", "activity_counts",
           "preset_activities", "preset_classes", "LOOK_ALIKE_PAIRS", "GENERATOR_VERSION", "DEFAULT_COUNTS",
           "MIN_IMAGE_SIZE", "CARD_NAME"]

GENERATOR_VERSION = "1.1"  # 1.1: fluid bleb and exposed submucosa drawn alike (dye); bump whenever the pixels or the card change for the same parameters
CARD_NAME = "dataset_card.json"
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096
SPLITS = ("train", "test")
DEFAULT_COUNTS = {"mtlesd": (120, 30), "mtlendovis": (240, 60), "mtlendovis_gen": (0, 48)}  # (train, test)
LOOK_ALIKE_PAIRS: dict[str, list[tuple[str, str]]] = {
    # mtlesd: the instruments (one shaft style) and the dye-stained regions (one drawing function, _draw_stained)
    "mtlesd": [("injection_needle", "electrosurgical_knife"), ("fluid_bleb", "exposed_submucosa")],
    "mtlendovis": [("bipolar_forceps", "prograsp_forceps")],
    "mtlendovis_gen": [("bipolar_forceps", "prograsp_forceps")],
}
NOTE = ("Synthetic scenes drawn by endoarss_lib.data.synthetic to exercise the pipeline; they reproduce nothing of "
        "the paper's data or results.")
_PRESET_IDS = {"mtlesd": 0, "mtlendovis": 1, "mtlendovis_gen": 2}
_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
_PNG_LEVEL = 1  # zlib level: files ~20% larger than the default 6, written about four times as fast

# Activity frequencies. ESD: roughly balanced like the real three. EndoVis: Zipf (1 / rank), common to rare.
_ESD_SHARE = {"marking": 0.30, "injection": 0.30, "submucosal_dissection": 0.40}
_ENDOVIS_BY_FREQUENCY = ("manipulation", "idle", "grasping", "retraction", "cutting", "cauterization", "suturing",
                         "suction", "looping", "clipping", "ultrasound_sensing", "stapling")


# ----------------------------------------------------------------------------------------------------- presets
def _spec(preset: str) -> DatasetSpec:
    return DATASETS[SYNTHETIC_PRESETS[_check_preset(preset)]]


def preset_activities(preset: str) -> tuple[str, ...]:
    """Names of the activities a preset draws (the gen preset: its six of the twelve)."""
    spec = _spec(preset)
    ids = spec.eval_activities if spec.eval_activities is not None else range(spec.num_activities)
    return tuple(spec.activities[i] for i in ids)


def preset_classes(preset: str) -> tuple[str, ...]:
    """Names of the segmentation classes a preset draws, background first."""
    spec = _spec(preset)
    ids = spec.eval_seg_classes if spec.eval_seg_classes is not None else range(spec.num_seg_classes)
    return tuple(spec.seg_classes[i] for i in ids)


def _activity_weights(preset: str) -> np.ndarray:
    names = preset_activities(preset)
    if preset == "mtlesd":
        return np.array([_ESD_SHARE[a] for a in names])
    return np.array([1.0 / (1 + _ENDOVIS_BY_FREQUENCY.index(a)) for a in names])


def activity_counts(preset: str, n: int) -> dict[str, int]:
    """``n`` images spread over the preset's activities by its frequency profile (every activity >= 1 if n >= K)."""
    n = _check_count("n", n)
    share = _activity_weights(preset)
    share = share / share.sum() * n
    counts = np.floor(share).astype(int)
    by_remainder = np.argsort(-(share - counts), kind="stable")
    counts[by_remainder[: n - counts.sum()]] += 1
    if n >= counts.size:
        for i in np.flatnonzero(counts == 0):  # the rarest still appear: take one from the most frequent
            counts[np.argmax(counts)] -= 1
            counts[i] += 1
    return dict(zip(preset_activities(preset), counts.tolist()))


def sample_rng(seed: int, preset: str, split: str, activity: int, k: int) -> np.random.Generator:
    """The generator of the ``k``-th image of ``activity`` (id-space index) in ``split``: independent of the counts."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split={split!r}: expected one of {list(_SPLIT_IDS)}")
    key = [_check_seed(seed), _PRESET_IDS[_check_preset(preset)], _SPLIT_IDS[split], int(activity), int(k)]
    return np.random.default_rng(np.random.SeedSequence(key))


# ------------------------------------------------------------------------------------------------- validation
def _check_preset(preset) -> str:
    if not isinstance(preset, str) or preset not in SYNTHETIC_PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(SYNTHETIC_PRESETS)}")
    return preset


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: expected an int")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r}: expected an int in [{low}, {high if high is not None else 'inf'}]")
    return int(value)


def _check_count(name: str, value) -> int:
    return _check_int(name, value, 0)


def _check_seed(seed) -> int:
    return _check_int("seed", seed, 0)


def _check_size(image_size) -> int:
    return _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def _activity_index(preset: str, activity) -> int:
    """Id-space index of ``activity`` (a name or an index), which must be one the preset draws."""
    spec = _spec(preset)
    names = preset_activities(preset)
    if isinstance(activity, (int, np.integer)) and not isinstance(activity, bool):
        if 0 <= activity < spec.num_activities and spec.activities[activity] in names:
            return int(activity)
    elif activity in names:
        return spec.activities.index(activity)
    raise ValueError(f"activity={activity!r}: preset {preset!r} draws {list(names)} (or their indices in "
                     f"{list(spec.activities)})")


# ------------------------------------------------------------------------------------------------ noise fields
@functools.lru_cache(maxsize=8)
def _coords(size: int) -> np.ndarray:
    """Pixel centres in [-1, 1] (read-only)."""
    xs = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
    xs.flags.writeable = False
    return xs


@functools.lru_cache(maxsize=64)
def _interp(size: int, cells: int) -> np.ndarray:
    """Gaussian interpolation weights from a (cells+2) knot lattice to ``size`` pixels, unit output variance."""
    knots = (np.arange(cells + 2) - 0.5) * (2.0 / cells) - 1.0  # one knot beyond each edge: no border artefacts
    w = np.exp(-0.5 * ((_coords(size)[:, None] - knots[None, :]) / (0.7 * 2.0 / cells)) ** 2)
    w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True))  # separable, so each pixel's variance is exactly 1
    w.flags.writeable = False
    return w


def _field(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """A smooth zero-mean unit-variance random field with about ``cells`` blobs across the image."""
    cells = max(2, int(round(cells)))
    w = _interp(size, cells)
    return w @ rng.standard_normal((cells + 2, cells + 2)) @ w.T


# --------------------------------------------------------------------------------------------------- the canvas
@dataclass(frozen=True)
class _Look:
    """The appearance of a preset: tissue palette, texture scale, lighting, field of view, camera."""

    tissue: tuple
    alt: tuple  # second tissue colour (paler mucosa / fat), mixed in by a smooth field
    vessel: tuple
    texture: float  # multiplies the tissue's noise frequencies
    vessels: float  # vessel opacity
    falloff: float  # light falloff from the light's centre
    fov_radius: float  # in half-image units; > 1 cuts only the corners
    fov_edge: float  # width of the soft vignette edge
    tint: tuple = (1.0, 1.0, 1.0)  # camera white balance
    blur: bool = False
    noise: float = 0.0


_LOOKS = {
    "mtlesd": _Look(tissue=(0.80, 0.40, 0.35), alt=(0.90, 0.62, 0.55), vessel=(0.42, 0.06, 0.10), texture=1.0,
                    vessels=0.65, falloff=0.55, fov_radius=0.97, fov_edge=0.03),
    "mtlendovis": _Look(tissue=(0.78, 0.36, 0.34), alt=(0.92, 0.74, 0.56), vessel=(0.48, 0.08, 0.12), texture=1.0,
                        vessels=0.5, falloff=0.45, fov_radius=1.3, fov_edge=0.05),
    "mtlendovis_gen": _Look(tissue=(0.90, 0.60, 0.30), alt=(0.97, 0.84, 0.46), vessel=(0.55, 0.20, 0.10),
                            texture=1.8, vessels=0.35, falloff=0.9, fov_radius=0.93, fov_edge=0.16,
                            tint=(1.04, 1.0, 0.86), blur=True, noise=0.025),
}


class _Canvas:
    """A scene being drawn: planar float RGB image (3, H, W), the train-id mask, coordinates, smooth fields."""

    def __init__(self, size: int, rng: np.random.Generator, look: _Look, classes: tuple[str, ...]):
        self.size, self.rng, self.look, self.classes = size, rng, look, classes
        self.xs = _coords(size)
        self.img = np.empty((3, size, size))  # planar: per-channel passes are contiguous
        self.mask = np.zeros((size, size), np.uint8)
        self.shape = np.zeros((size, size))  # a smooth field that bends blob outlines (set with the tissue)

    def class_id(self, name: str) -> int:
        return self.classes.index(name)

    def window(self, x0: float, x1: float, y0: float, y1: float):
        """Slices of a box in normalised coordinates (clipped), with local x (1, w) and y (h, 1); None if empty."""
        s = self.size
        c0, c1 = max(int(np.floor((x0 + 1) * s / 2)), 0), min(int(np.ceil((x1 + 1) * s / 2)), s)
        r0, r1 = max(int(np.floor((y0 + 1) * s / 2)), 0), min(int(np.ceil((y1 + 1) * s / 2)), s)
        if c1 <= c0 or r1 <= r0:
            return None
        return (slice(r0, r1), slice(c0, c1)), self.xs[None, c0:c1], self.xs[r0:r1, None]

    def around(self, cx: float, cy: float, r: float):
        """The window of a disc of radius ``r``."""
        return self.window(cx - r, cx + r, cy - r, cy + r)

    def view(self, sl) -> np.ndarray:
        """The (3, h, w) image region of a window."""
        return self.img[:, sl[0], sl[1]]

    def blend(self, sl, alpha: np.ndarray, rgb) -> None:
        """Mix ``rgb`` (a colour, or per-pixel colours (3, h, w)) into the image with per-pixel opacity ``alpha``."""
        region = self.view(sl)
        rgb = np.asarray(rgb)
        region += alpha * ((rgb[:, None, None] if rgb.ndim == 1 else rgb) - region)

    def set_pixels(self, sl, inside: np.ndarray, colours: np.ndarray) -> None:
        """Overwrite the pixels ``inside`` with ``colours`` (n, 3)."""
        self.view(sl)[:, inside] = colours.T

    def darken(self, sl, inside: np.ndarray, factor: float) -> None:
        self.view(sl)[:, inside] *= factor

    def label(self, sl, inside: np.ndarray, name: str) -> None:
        """Set the mask of the pixels ``inside`` to the class ``name`` (the same boolean that painted them)."""
        self.mask[sl][inside] = self.class_id(name)


# ------------------------------------------------------------------------------------------------- the tissue
def _draw_tissue(cv: _Canvas) -> None:
    """Mucosa: two colours mixed by smooth fields, fine texture, vessels as contour lines of a noise field."""
    rng, lk, s, tex = cv.rng, cv.look, cv.size, cv.look.texture
    base = np.asarray(lk.tissue) * (1.0 + 0.05 * rng.standard_normal(3))  # per-image colour variation
    low = 0.8 * _field(rng, s, 3 * tex) + 0.45 * _field(rng, s, 7 * tex)
    mix = np.clip(0.35 * _field(rng, s, 4 * tex) - 0.05, 0.0, 0.7)
    fine = _field(rng, s, 30 * min(tex, 1.2))  # capped: the finest octave costs the most
    vein = _field(rng, s, 6 * tex) + 0.3 * _field(rng, s, 14 * tex)
    cv.shape = _field(rng, s, 9)  # reused to make blobs irregular
    # Zero crossings of a smooth field are closed curvy lines: vessels; a second field thins them out in places.
    vessel = np.clip(1.3 - np.abs(vein) * (9.0 / tex), 0.0, 1.0) * np.clip(0.5 + low, 0.0, 1.0) * lk.vessels
    # colour = (base + mix (alt - base)) * bright, then vessel blended over: one fused pass per channel
    mucosa = (1.0 + 0.16 * low + 0.05 * fine) * (1.0 - vessel)
    mixed = mucosa * mix
    for c in range(3):
        np.multiply(mucosa, base[c], out=cv.img[c])
        cv.img[c] += mixed * (lk.alt[c] - base[c]) + vessel * lk.vessel[c]


def _draw_speculars(cv: _Canvas) -> None:
    """Small white highlights where the wet mucosa reflects the light (tissue only, never on the classes)."""
    rng = cv.rng
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(-0.7, 0.7, 2)
        r, ratio, ang = rng.uniform(0.008, 0.025), rng.uniform(1.0, 2.5), rng.uniform(0, np.pi)
        win = cv.around(cx, cy, r * ratio * 2.0)
        if win is None:
            continue
        sl, x, y = win
        u, v = _rotate(x - cx, y - cy, ang)
        glow = np.exp(-((u / (r * ratio)) ** 2 + (v / r) ** 2))
        inside = cv.mask[sl] == 0
        cv.blend(sl, np.clip(1.6 * glow - 0.25, 0.0, 1.0) * inside, (1.0, 1.0, 1.0))


def _apply_light(cv: _Canvas) -> None:
    """Light falls off from a centre near the scope's axis (instruments are lit on their own, see _metal)."""
    lx, ly = cv.rng.normal(0.0, 0.15, 2)
    gain = 1.1 - cv.look.falloff * ((cv.xs[None, :] - lx) ** 2 + (cv.xs[:, None] - ly) ** 2)
    cv.img *= np.clip(gain, 0.2, 1.1)


def _finish(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Circular field of view (black outside, background id), camera tint, blur and noise; to uint8."""
    lk, rng = cv.look, cv.rng
    radius = lk.fov_radius * rng.uniform(0.97, 1.0)
    fov = np.clip((radius - _radius(cv.size)) * (1.0 / lk.fov_edge), 0.0, 1.0)
    cv.mask[fov < 0.5] = 0
    img = cv.img
    img *= fov
    if lk.tint != (1.0, 1.0, 1.0):
        img *= np.asarray(lk.tint)[:, None, None]
    if lk.blur:
        _blur3(img)
    if lk.noise:
        img += lk.noise * rng.standard_normal((cv.size, cv.size)) * (fov > 0)
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.transpose(1, 2, 0).astype(np.uint8), cv.mask


@functools.lru_cache(maxsize=8)
def _radius(size: int) -> np.ndarray:
    """Distance of every pixel centre from the image centre (read-only)."""
    xs = _coords(size)
    r = np.sqrt(xs[None, :] ** 2 + xs[:, None] ** 2)
    r.flags.writeable = False
    return r


def _blur3(img: np.ndarray) -> None:
    """In-place separable [1, 2, 1] / 4 blur of a planar image (a softer lens)."""
    for axis in (1, 2):
        ndimage.correlate1d(img, [0.25, 0.5, 0.25], axis=axis, output=img, mode="nearest")


def _col(r: float, g: float, b: float) -> np.ndarray:
    """A colour shaped (3, 1, 1) to broadcast against planar (3, h, w) regions."""
    return np.array([r, g, b])[:, None, None]


def _rotate(x, y, angle: float):
    """Coordinates in a frame rotated by ``angle`` (u along the direction, v across it)."""
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, y * c - x * s


# -------------------------------------------------------------------------------------------------- primitives
def _blob(cv: _Canvas, cx, cy, rx, ry, angle, wobble=0.25):
    """Window and inside-boolean of an irregular ellipse (its edge bent by the canvas's shape field)."""
    win = cv.around(cx, cy, max(rx, ry) * (1.0 + 2 * wobble))
    if win is None:
        return None
    sl, x, y = win
    u, v = _rotate(x - cx, y - cy, angle)
    rn = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) + wobble * cv.shape[sl]
    return sl, rn < 1.0, rn


def _metal(s: np.ndarray, grey: np.ndarray | float, tint) -> np.ndarray:
    """Colours of a lit metal cylinder at ``s`` = position across it in [-1, 1] (shading plus a highlight streak)."""
    profile = 0.45 + 0.55 * np.sqrt(np.clip(1.0 - s * s, 0.0, 1.0))
    streak = 0.45 * np.exp(-(((s + 0.35) / 0.22) ** 2))
    return (grey * profile)[:, None] * np.asarray(tint) + streak[:, None]


def _paint_metal(cv, sl, inside, s, grey, tint, name=None) -> None:
    """Paint metal over the pixels ``inside`` (``s`` and ``grey`` per window pixel or scalar) and label them."""
    if not inside.any():
        return
    g = grey[inside] if np.ndim(grey) else np.full(int(inside.sum()), grey)
    cv.set_pixels(sl, inside, _metal(s[inside], g, tint))
    if name is not None:
        cv.label(sl, inside, name)


def _bars(cv, p0, angle, length, offsets, period, duty, half_length, rgb):
    """A row of short bars (clips, staples, stitches) along a line: one window, no per-bar loop."""
    x0, y0 = p0
    x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
    pad = max(abs(o) for o in offsets) + half_length
    win = cv.window(min(x0, x1) - pad, max(x0, x1) + pad, min(y0, y1) - pad, max(y0, y1) + pad)
    if win is None:
        return
    sl, x, y = win
    t, d = _rotate(x - x0, y - y0, angle)
    along = (t >= 0) & (t <= length) & (np.mod(t, period) < duty * period)
    inside = np.zeros(along.shape, bool)
    for off in offsets:
        inside |= along & (np.abs(d - off) <= half_length)
    s = (np.mod(t, period) / (duty * period)) * 2.0 - 1.0  # shading across each bar
    _paint_metal(cv, sl, inside, s, 1.0, rgb)


def _band(cv, p0, angle, length, half_width, rgb) -> None:
    """A straight flat-coloured band (vessel, incision, seam)."""
    x0, y0 = p0
    x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
    win = cv.window(min(x0, x1) - half_width, max(x0, x1) + half_width, min(y0, y1) - half_width,
                    max(y0, y1) + half_width)
    if win is None:
        return
    sl, x, y = win
    t, d = _rotate(x - x0, y - y0, angle)
    cv.blend(sl, 1.0 * ((t >= 0) & (t <= length) & (np.abs(d) <= half_width)), rgb)


def _arc(cv, cx, cy, radius, half_width, a0, a1, rgb) -> None:
    """A thin circular arc from angle ``a0`` to ``a1`` (thread, suture needle)."""
    win = cv.around(cx, cy, radius + half_width)
    if win is None:
        return
    sl, x, y = win
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    ang = np.mod(np.arctan2(y - cy, x - cx) - a0, 2 * np.pi)
    inside = (np.abs(r - radius) <= half_width) & (ang <= np.mod(a1 - a0, 2 * np.pi))
    cv.blend(sl, 1.0 * inside, rgb)


# ------------------------------------------------------------------------------------------------ instruments
@dataclass(frozen=True)
class _ToolStyle:
    """How one instrument type looks: shaft width and metal, and its tip."""

    half_width: tuple  # shaft half-width range (half-image units)
    grey: tuple  # metal brightness range
    tint: tuple
    tip: str  # "jaws", "needle", "blunt" or "probe"
    tip_length: tuple
    tip_width: float  # tip half-width as a fraction of the shaft's
    opening: tuple  # jaw opening range, radians
    tip_tint: tuple = (1.0, 1.0, 1.0)
    curve: float = 0.0  # bend of the jaws (curved scissors)
    wrist: float = 0.0  # length of the dark wrist band before the tip


@dataclass(frozen=True)
class _Tool:
    """One instrument in one image: its class, style and sampled geometry."""

    name: str
    style: _ToolStyle
    entry: tuple
    tip: tuple
    half_width: float
    grey: float
    tip_length: float
    opening: float

    @property
    def direction(self) -> tuple[float, float]:
        dx, dy = self.tip[0] - self.entry[0], self.tip[1] - self.entry[1]
        n = np.hypot(dx, dy)
        return dx / n, dy / n

    @property
    def angle(self) -> float:
        return float(np.arctan2(*self.direction[::-1]))


# The look-alike pairs share one style object: identical width, metal, tip and opening distributions.
_ESD_SHAFT = _ToolStyle(half_width=(0.024, 0.034), grey=(0.55, 0.8), tint=(1.0, 1.0, 1.03), tip="needle",
                        tip_length=(0.06, 0.10), tip_width=0.4, opening=(0.0, 0.0))
_GRASPER = _ToolStyle(half_width=(0.07, 0.09), grey=(0.5, 0.7), tint=(1.0, 1.0, 1.0), tip="jaws",
                      tip_length=(0.17, 0.23), tip_width=0.6, opening=(0.1, 0.5), wrist=0.06)
_TOOL_STYLES = {
    "injection_needle": _ESD_SHAFT, "electrosurgical_knife": _ESD_SHAFT,
    "bipolar_forceps": _GRASPER, "prograsp_forceps": _GRASPER,
    "large_needle_driver": _ToolStyle(half_width=(0.07, 0.085), grey=(0.45, 0.6), tint=(0.95, 0.98, 1.06),
                                      tip="jaws", tip_length=(0.12, 0.16), tip_width=0.85, opening=(0.0, 0.12),
                                      tip_tint=(0.55, 0.55, 0.58), wrist=0.05),
    "monopolar_curved_scissors": _ToolStyle(half_width=(0.075, 0.095), grey=(0.5, 0.65), tint=(1.0, 0.98, 0.96),
                                            tip="jaws", tip_length=(0.15, 0.19), tip_width=0.5, opening=(0.1, 0.35),
                                            tip_tint=(1.15, 0.95, 0.6), curve=2.0, wrist=0.12),
    "clip_applier": _ToolStyle(half_width=(0.06, 0.075), grey=(0.68, 0.85), tint=(1.0, 1.0, 1.0), tip="jaws",
                               tip_length=(0.22, 0.28), tip_width=0.4, opening=(0.05, 0.2), wrist=0.03),
    "suction_instrument": _ToolStyle(half_width=(0.04, 0.05), grey=(0.75, 0.9), tint=(1.04, 1.0, 0.94),
                                     tip="blunt", tip_length=(0.0, 0.0), tip_width=1.0, opening=(0.0, 0.0)),
    "ultrasound_probe": _ToolStyle(half_width=(0.05, 0.06), grey=(0.3, 0.4), tint=(1.0, 1.0, 1.0), tip="probe",
                                   tip_length=(0.26, 0.34), tip_width=2.2, opening=(0.0, 0.0),
                                   tip_tint=(0.95, 0.95, 0.88)),
}


def _sample_tool(rng: np.random.Generator, name: str, target, entry_angle: float, entry_radius=1.5) -> _Tool:
    """An instrument entering from beyond the border at ``entry_angle`` with its tip at ``target``."""
    st = _TOOL_STYLES[name]
    entry = (entry_radius * np.cos(entry_angle), entry_radius * np.sin(entry_angle))
    hw, grey, tip_len, opening = (rng.uniform(*st.half_width), rng.uniform(*st.grey), rng.uniform(*st.tip_length),
                                  rng.uniform(*st.opening))
    return _Tool(name, st, entry, (float(target[0]), float(target[1])), hw, grey, tip_len, opening)


def _draw_tool(cv: _Canvas, tool: _Tool) -> None:
    """Shaft from the entry point to the wrist (metal shading, brighter towards the tip), then the tip."""
    st, (ex, ey), (tx, ty), hw = tool.style, tool.entry, tool.tip, tool.half_width
    ux, uy = tool.direction
    total = np.hypot(tx - ex, ty - ey)
    shaft_len = total - tool.tip_length
    pad = hw * max(st.tip_width, 1.0) * 1.5
    win = cv.window(min(ex, tx) - pad, max(ex, tx) + pad, min(ey, ty) - pad, max(ey, ty) + pad)
    if win is None:
        return
    sl, x, y = win
    t = (x - ex) * ux + (y - ey) * uy
    d = (y - ey) * ux - (x - ex) * uy
    shaft = (t >= 0) & (t <= shaft_len) & (np.abs(d) <= hw)
    grey = tool.grey * (0.8 + 0.2 * np.clip(t / total, 0, 1)) * np.where(t > shaft_len - st.wrist, 0.45, 1.0)
    _paint_metal(cv, sl, shaft, d / hw, grey, st.tint, tool.name)
    _TIPS[st.tip](cv, tool, shaft_len)


def _tip_jaws(cv: _Canvas, tool: _Tool, shaft_len: float, n_jaws: int = 2) -> None:
    """Two tapered jaws hinged at the wrist, opened symmetrically (one for a needle tip)."""
    st, hw = tool.style, tool.half_width
    ux, uy = tool.direction
    wx, wy = tool.entry[0] + shaft_len * ux, tool.entry[1] + shaft_len * uy
    win = cv.around(wx, wy, tool.tip_length + hw * 2)
    if win is None:
        return
    sl, x, y = win
    jaw_hw = st.tip_width * hw * (0.6 if n_jaws == 2 else 1.0)
    for side in ((-1.0, 1.0) if n_jaws == 2 else (0.0,)):
        ang = tool.angle + side * tool.opening / 2
        bx, by = wx - side * 0.4 * hw * uy, wy + side * 0.4 * hw * ux  # jaws sit side by side when closed
        t, d = _rotate(x - bx, y - by, ang)
        d = d - st.curve * t * t
        width = jaw_hw * (1.0 - 0.55 * np.clip(t / tool.tip_length, 0, 1))
        inside = (t >= 0) & (t <= tool.tip_length) & (np.abs(d) <= width)
        _paint_metal(cv, sl, inside, d / np.maximum(width, 1e-9), tool.grey, st.tip_tint, tool.name)


def _tip_needle(cv: _Canvas, tool: _Tool, shaft_len: float) -> None:
    _tip_jaws(cv, tool, shaft_len, n_jaws=1)


def _tip_blunt(cv: _Canvas, tool: _Tool, shaft_len: float) -> None:
    """A rounded open end (suction cannula)."""
    tx, ty, hw = tool.tip[0], tool.tip[1], tool.half_width
    win = cv.around(tx, ty, hw)
    if win is None:
        return
    sl, x, y = win
    ux, uy = tool.direction
    d = (y - ty) * ux - (x - tx) * uy
    inside = (x - tx) ** 2 + (y - ty) ** 2 <= hw * hw
    _paint_metal(cv, sl, inside, d / hw, tool.grey, tool.style.tint, tool.name)
    hole = (x - tx) ** 2 + (y - ty) ** 2 <= (0.45 * hw) ** 2  # the lumen
    cv.darken(sl, hole, 0.3)


def _tip_probe(cv: _Canvas, tool: _Tool, shaft_len: float) -> None:
    """A thick pale capsule with a dark transducer window (drop-in ultrasound probe)."""
    st = tool.style
    ux, uy = tool.direction
    wx, wy = tool.entry[0] + shaft_len * ux, tool.entry[1] + shaft_len * uy
    r = st.tip_width * tool.half_width
    win = cv.around(wx, wy, tool.tip_length + r * 2)
    if win is None:
        return
    sl, x, y = win
    t = (x - wx) * ux + (y - wy) * uy
    d = (y - wy) * ux - (x - wx) * uy
    tc = np.clip(t, r, tool.tip_length - r)  # capsule: distance to the core segment
    inside = (t >= 0) & ((t - tc) ** 2 + d * d <= r * r)
    _paint_metal(cv, sl, inside, d / r, 0.85, st.tip_tint, tool.name)
    window = inside & (np.abs(d) < 0.3 * r) & (t > 0.3 * tool.tip_length) & (t < 0.85 * tool.tip_length)
    cv.darken(sl, window, 0.35)


_TIPS: dict[str, Callable] = {"jaws": _tip_jaws, "needle": _tip_needle, "blunt": _tip_blunt, "probe": _tip_probe}


# ------------------------------------------------------------------------------------------------ ESD scenes
def _draw_lesion(cv: _Canvas):
    """The flat lesion to be resected: paler, granular, irregular (background class). Returns centre and radius."""
    rng = cv.rng
    cx, cy = rng.uniform(-0.25, 0.25, 2)
    r = rng.uniform(0.2, 0.32)
    found = _blob(cv, cx, cy, r, r * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), wobble=0.2)
    if found is not None:
        sl, inside, rn = found
        cv.blend(sl, 0.5 * ((rn >= 0.9) & (rn < 1.0)), (0.55, 0.18, 0.16))  # raised, darker border
        cv.blend(sl, (0.35 + 0.25 * np.clip(1.0 - rn, 0.0, 1.0)) * (rn < 0.9), (0.94, 0.62, 0.55))
    return cx, cy, r


def _ring_points(cx, cy, radius, n, phase):
    ang = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([cx + radius * np.cos(ang), cy + radius * np.sin(ang)], axis=1)


def _draw_spots(cv: _Canvas, points, radius: float) -> None:
    """Coagulation marking dots: whitish centre, brown rim (class marking_spot)."""
    for px, py in points:
        win = cv.around(px, py, radius)
        if win is None:
            continue
        sl, x, y = win
        d2 = ((x - px) ** 2 + (y - py) ** 2) / (radius * radius)
        inside = d2 <= 1.0
        core = d2 < 0.35
        cv.blend(sl, 1.0 * inside, np.where(core, _col(0.95, 0.9, 0.72), _col(0.45, 0.26, 0.16)))
        cv.label(sl, inside, "marking_spot")


def _draw_stained(cv: _Canvas, cx, cy, angle, name: str) -> None:
    """A region stained by the injected dye (indigo carmine): the fluid bleb lifted by the injection and the
    submucosa exposed by the dissection look alike in real ESD, so both classes are drawn by this one function with
    the same parameter distributions (size, shape, dye colour, opacity, fibres); only the activity context (the
    needle or the knife, bleeding at the cut) tells them apart. The same random draws happen for either class."""
    rng = cv.rng
    rx = rng.uniform(0.15, 0.26)
    ry = rx * rng.uniform(0.65, 1.0)
    found = _blob(cv, cx, cy, rx, ry, angle + rng.normal(0.0, 0.3), wobble=0.15)
    if found is None:
        return
    sl, inside, rn = found
    dome = np.sqrt(np.clip(1.0 - rn * rn, 0.0, 1.0))
    x, y = cv.xs[None, sl[1]], cv.xs[sl[0], None]
    fibre_angle = rng.uniform(0, np.pi)
    fibres = 0.9 + 0.1 * np.sin(rng.uniform(50, 80) * (x * np.cos(fibre_angle) + y * np.sin(fibre_angle))
                                 + 4 * cv.shape[sl])
    dye = _col(0.42, 0.58, 0.92) * rng.uniform(0.92, 1.08)
    cv.blend(sl, np.clip((rng.uniform(0.5, 0.65) + 0.3 * dome) * fibres, 0.0, 1.0) * inside, dye)
    cv.label(sl, inside, name)


def _draw_bleeding(cv: _Canvas, cx, cy, reach: float) -> None:
    """Blood oozing at the cut (class bleeding): 1-3 small dark-red blobs near (cx, cy), in 60 % of dissections."""
    rng = cv.rng
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.6 else 0):
        a = rng.uniform(0, 2 * np.pi)
        bx, by = cx + reach * np.cos(a), cy + reach * np.sin(a)
        blood = _blob(cv, bx, by, rng.uniform(0.02, 0.05), rng.uniform(0.015, 0.035), a, wobble=0.3)
        if blood is not None:
            bsl, bin_, _ = blood
            cv.blend(bsl, 1.0 * bin_, (0.5, 0.02, 0.04))
            cv.label(bsl, bin_, "bleeding")


def _esd_scene(cv: _Canvas, activity: str) -> list[_Tool]:
    """Lesion, marks and the activity's cue; the needle appears only in injection, the knife otherwise."""
    rng = cv.rng
    cx, cy, r = _draw_lesion(cv)
    ring = _ring_points(cx, cy, r + 0.08, int(rng.integers(8, 15)), rng.uniform(0, 2 * np.pi))
    spot_r = rng.uniform(0.024, 0.034)
    if activity == "marking":
        done = int(rng.integers(2, len(ring)))
        _draw_spots(cv, ring[:done], spot_r)
        target, tool = ring[done], "electrosurgical_knife"
    else:
        if rng.random() < 0.7:  # the marks stay visible after marking
            _draw_spots(cv, ring, spot_r)
        a = rng.uniform(0, 2 * np.pi)
        edge = (cx + r * np.cos(a), cy + r * np.sin(a))
        _draw_stained(cv, edge[0], edge[1], a, "fluid_bleb" if activity == "injection" else "exposed_submucosa")
        if activity == "injection":
            target, tool = edge, "injection_needle"
        else:
            _draw_bleeding(cv, edge[0], edge[1], rng.uniform(0.12, 0.22))
            target, tool = edge, "electrosurgical_knife"
    return [_sample_tool(rng, tool, target, rng.uniform(0.2 * np.pi, 0.8 * np.pi), entry_radius=1.3)]


# -------------------------------------------------------------------------------------------- robotic scenes
def _cue_smoke(cv, tool):
    """Cauterisation: a soft grey plume over the tip and burnt dark spots on the tissue."""
    rng = cv.rng
    tx, ty = tool.tip
    for _ in range(int(rng.integers(2, 5))):
        bx, by = tx + rng.normal(0, 0.06), ty + rng.normal(0, 0.06)
        burn = _blob(cv, bx, by, rng.uniform(0.03, 0.07), rng.uniform(0.02, 0.05), rng.uniform(0, np.pi))
        if burn is not None:
            cv.blend(burn[0], 0.85 * burn[1], (0.22, 0.12, 0.08))
    r = rng.uniform(0.3, 0.5)
    cx, cy = tx + rng.normal(0, 0.05), ty - 0.08
    win = cv.around(cx, cy, 2 * r)
    if win is not None:
        sl, x, y = win
        haze = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (r * r)) * np.clip(0.6 + 0.5 * cv.shape[sl], 0, 1)
        cv.blend(sl, 0.75 * haze, (0.88, 0.87, 0.85))


def _cue_clips(cv, tool):
    """Clipping: a vessel across the tip's path with two or three metal clips on it."""
    rng = cv.rng
    ang = tool.angle + np.pi / 2 + rng.normal(0, 0.3)
    tx, ty = tool.tip
    start = (tx - 0.3 * np.cos(ang), ty - 0.3 * np.sin(ang))
    _band(cv, start, ang, 0.6, 0.045, (0.5, 0.1, 0.14))  # the vessel
    n = int(rng.integers(2, 4))
    first = (tx + 0.04 * np.cos(ang), ty + 0.04 * np.sin(ang))
    _bars(cv, first, ang, 0.1 * n, (0.0,), 0.1, 0.35, 0.08, (0.85, 0.85, 0.9))


def _cue_incision(cv, tool):
    """Cutting: a fresh incision from the scissors' tip: dark red core, pale edges."""
    rng = cv.rng
    ang = tool.angle + rng.normal(0, 0.5)
    length = rng.uniform(0.2, 0.35)
    start = (tool.tip[0] - 0.05 * np.cos(ang), tool.tip[1] - 0.05 * np.sin(ang))
    _band(cv, start, ang, length, 0.03, (0.98, 0.8, 0.75))
    _band(cv, start, ang, length, 0.012, (0.45, 0.03, 0.05))


def _cue_fold(cv, tool, length=0.3, width=0.07, stripes=False):
    """Grasping: a tented tissue ridge pulled into the jaws (retraction: longer, wider and striated)."""
    tx, ty = tool.tip
    ux, uy = tool.direction
    win = cv.around(tx + 0.4 * length * ux, ty + 0.4 * length * uy, 0.6 * length + 2 * width)
    if win is None:
        return
    sl, x, y = win
    t = (x - tx) * ux + (y - ty) * uy  # ahead of the tip, where the held tissue is (behind it: under the shaft)
    d = (y - ty) * ux - (x - tx) * uy
    along = np.clip(1.0 - np.abs(t / length - 0.35) / 0.6, 0.0, 1.0) * (t > -0.3 * width)
    ridge = np.exp(-((d / width) ** 2)) * along
    if stripes:
        ridge = ridge * (0.6 + 0.4 * np.cos(d * (5.0 * np.pi / width)))
    cv.blend(sl, 0.85 * ridge, (0.98, 0.74, 0.68))
    shadow = np.exp(-(((d - 1.3 * width) / (0.4 * width)) ** 2)) * along
    cv.blend(sl, 0.6 * shadow, (0.3, 0.05, 0.05))


def _cue_stretch(cv, tool):
    """Retraction: a long, wide band of tissue pulled taut towards the grasper, with stretch striations."""
    _cue_fold(cv, tool, length=0.6, width=0.16, stripes=True)


def _cue_dimple(cv, tool):
    """Manipulation: the tip pushes the tissue: dark dimple with a bright rim."""
    tx, ty = tool.tip
    win = cv.around(tx, ty, 0.3)
    if win is None:
        return
    sl, x, y = win
    r = np.sqrt((x - tx) ** 2 + (y - ty) ** 2)
    cv.blend(sl, 0.65 * np.exp(-((r / 0.13) ** 2)), (0.28, 0.05, 0.06))
    cv.blend(sl, 0.6 * np.exp(-(((r - 0.17) / 0.03) ** 2)), (0.98, 0.75, 0.7))


def _cue_loop(cv, tool):
    """Looping: a suture thread wound into a loop beside the needle driver's jaws."""
    rng = cv.rng
    tx, ty = tool.tip
    cx, cy = tx + rng.normal(0, 0.05), ty + rng.normal(0, 0.05)
    radius = rng.uniform(0.09, 0.14)
    _arc(cv, cx, cy, radius, 0.012, 0.0, 2 * np.pi - 1e-6, (0.72, 0.62, 0.9))
    a = rng.uniform(0, 2 * np.pi)
    _arc(cv, cx + 0.35 * np.cos(a), cy + 0.35 * np.sin(a), 0.35 - radius, 0.01, a + 2.4, a + 3.9, (0.72, 0.62, 0.9))


def _cue_staples(cv, tool):
    """Stapling: two rows of metal staples along a closed line near the grasper."""
    rng = cv.rng
    ang = rng.uniform(0, np.pi)
    length = rng.uniform(0.4, 0.6)
    tx, ty = tool.tip
    start = (tx - 0.5 * length * np.cos(ang), ty - 0.5 * length * np.sin(ang))
    _band(cv, start, ang, length, 0.014, (0.45, 0.12, 0.12))
    _bars(cv, start, ang, length, (-0.05, 0.05), 0.05, 0.5, 0.014, (0.85, 0.85, 0.9))


def _cue_pool(cv, tool):
    """Suction: a glossy pool of blood and fluid around the cannula's tip."""
    rng = cv.rng
    tx, ty = tool.tip
    found = _blob(cv, tx, ty, rng.uniform(0.16, 0.28), rng.uniform(0.11, 0.2), rng.uniform(0, np.pi), wobble=0.35)
    if found is None:
        return
    sl, inside, rn = found
    cv.blend(sl, 0.9 * inside, (0.38, 0.03, 0.04))
    cv.blend(sl, 0.8 * inside * np.exp(-(((rn - 0.75) / 0.06) ** 2)) * (cv.shape[sl] > 0.3), (1.0, 0.95, 0.95))


def _cue_suture(cv, tool):
    """Suturing: a curved needle at the driver's tip, thread, and stitches across a closed incision."""
    rng = cv.rng
    tx, ty = tool.tip
    ang = rng.uniform(0, np.pi)
    start = (tx - 0.3 * np.cos(ang) + 0.08, ty - 0.3 * np.sin(ang))
    _band(cv, start, ang, 0.45, 0.012, (0.5, 0.12, 0.12))
    _bars(cv, start, ang, 0.45, (0.0,), 0.08, 0.2, 0.05, (0.72, 0.62, 0.9))  # stitches
    a0 = rng.uniform(0, 2 * np.pi)
    _arc(cv, tx, ty, 0.08, 0.011, a0, a0 + np.pi, (0.9, 0.9, 0.92))
    _arc(cv, tx + 0.2 * np.cos(a0), ty + 0.2 * np.sin(a0), 0.2, 0.009, a0 + np.pi - 0.2, a0 + np.pi + 1.2,
         (0.72, 0.62, 0.9))


def _cue_probe(cv, tool):
    """Ultrasound sensing: the probe rests flat on the tissue and shades it."""
    ux, uy = tool.direction
    cx, cy = tool.tip[0] - 0.5 * tool.tip_length * ux + 0.03, tool.tip[1] - 0.5 * tool.tip_length * uy + 0.03
    found = _blob(cv, cx, cy, 0.7 * tool.tip_length, 2.0 * tool.style.tip_width * tool.half_width, tool.angle, 0.05)
    if found is not None:
        cv.blend(found[0], 0.4 * (1.0 - np.clip(found[2], 0, 1)), (0.15, 0.02, 0.03))


# activity -> (main instrument, ((extra instrument, probability), ...), where tips go, context cue)
# Bipolar and ProGrasp forceps (the look-alike pair) never share an activity: the activity determines which it is.
_ROBOT_SCENES = {
    "cauterization": ("bipolar_forceps", (("large_needle_driver", 0.3),), "touch", _cue_smoke),
    "clipping": ("clip_applier", (("bipolar_forceps", 0.5),), "touch", _cue_clips),
    "cutting": ("monopolar_curved_scissors", (("bipolar_forceps", 0.6),), "touch", _cue_incision),
    "grasping": ("prograsp_forceps", (("monopolar_curved_scissors", 0.4),), "touch", _cue_fold),
    "idle": ("large_needle_driver", (("monopolar_curved_scissors", 0.7),), "away", None),
    "looping": ("large_needle_driver", (("large_needle_driver", 0.6),), "touch", _cue_loop),
    "manipulation": ("prograsp_forceps", (("large_needle_driver", 0.4),), "touch", _cue_dimple),
    "retraction": ("prograsp_forceps", (("monopolar_curved_scissors", 0.3),), "touch", _cue_stretch),
    "stapling": ("prograsp_forceps", (("suction_instrument", 0.3),), "touch", _cue_staples),
    "suction": ("suction_instrument", (("bipolar_forceps", 0.4),), "touch", _cue_pool),
    "suturing": ("large_needle_driver", (("large_needle_driver", 0.5),), "touch", _cue_suture),
    "ultrasound_sensing": ("ultrasound_probe", (("large_needle_driver", 0.3),), "touch", _cue_probe),
}


def _robot_scene(cv: _Canvas, activity: str) -> list[_Tool]:
    """Instruments of the activity (tips on the tissue, or held back near the border when idle) and its cue."""
    rng = cv.rng
    main, extras, mode, cue = _ROBOT_SCENES[activity]
    phi = rng.uniform(0, 2 * np.pi)
    if mode == "away":
        tip = _polar(rng.uniform(0.6, 0.85), phi + rng.uniform(-0.4, 0.4))
    else:
        tip = _polar(0.45 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi))
    tools = [_sample_tool(rng, main, tip, phi)]
    for name, prob in extras:
        present = rng.random() < prob
        phi2 = phi + np.pi + rng.uniform(-1.0, 1.0)
        if mode == "away":
            tip2 = _polar(rng.uniform(0.6, 0.85), phi2 + rng.uniform(-0.4, 0.4))
        else:
            tip2 = np.add(tip, _polar(rng.uniform(0.2, 0.4), rng.uniform(0, 2 * np.pi)))
        if present:
            tools.insert(0, _sample_tool(rng, name, tip2, phi2))  # the main instrument is drawn on top
    if cue is not None:
        cue(cv, tools[-1])
    return tools


def _polar(r, a):
    return (r * np.cos(a), r * np.sin(a))


# ----------------------------------------------------------------------------------------------- rendering
def render_sample(preset: str, activity, rng: np.random.Generator, image_size: int = 224):
    """One scene of ``activity`` (name or id-space index): uint8 RGB image (H, W, 3) and uint8 train-id mask (H, W)."""
    preset, size = _check_preset(preset), _check_size(image_size)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng={rng!r}: expected a numpy.random.Generator (e.g. sample_rng(...))")
    spec = _spec(preset)
    name = spec.activities[_activity_index(preset, activity)]
    cv = _Canvas(size, rng, _LOOKS[preset], spec.seg_classes)
    _draw_tissue(cv)
    tools = _esd_scene(cv, name) if preset == "mtlesd" else _robot_scene(cv, name)
    _draw_speculars(cv)
    _apply_light(cv)
    for tool in tools:  # last: cues never tint the instruments, so look-alike pairs keep identical colours
        _draw_tool(cv, tool)
    return _finish(cv)


# ------------------------------------------------------------------------------------------------- the dataset
def _split_sizes(preset: str, n_train, n_test) -> dict[str, int]:
    default_train, default_test = DEFAULT_COUNTS[preset]
    sizes = {"train": _check_count("n_train", default_train if n_train is None else n_train),
             "test": _check_count("n_test", default_test if n_test is None else n_test)}
    if not any(sizes.values()):
        raise ValueError("n_train=0 and n_test=0: nothing to generate")
    return sizes


def _plan(preset: str, sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Images per split and activity; a split of size 0 is not written."""
    return {split: activity_counts(preset, n) for split, n in sizes.items() if n > 0}


def _card(preset: str, seed: int, size: int, counts: dict) -> dict:
    spec = _spec(preset)
    return {"dataset": spec.name, "preset": preset, "synthetic": True, "seed": seed, "image_size": size,
            "generator_version": GENERATOR_VERSION, "counts": counts, "pixel_fraction": {},
            "activities": list(spec.activities), "seg_classes": list(spec.seg_classes),
            "used_activities": list(preset_activities(preset)), "used_seg_classes": list(preset_classes(preset)),
            "activity_folders": {a: str(spec.activities.index(a) + 1) for a in preset_activities(preset)},
            "look_alike_pairs": [list(p) for p in LOOK_ALIKE_PAIRS[preset]], "note": NOTE}


_CACHE_KEYS = ("preset", "seed", "counts", "image_size", "generator_version")


def _read_card(root: Path) -> dict | None:
    try:
        return json.loads((root / CARD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_cached(root: Path, card: dict) -> bool:
    held = _read_card(root)
    return held is not None and all(held.get(k) == card[k] for k in _CACHE_KEYS)


def _write_split(folder: Path, preset: str, seed: int, size: int, split: str, counts: dict) -> np.ndarray:
    """Render and write one split; returns the pixel count of every class id."""
    spec = _spec(preset)
    pixels = np.zeros(spec.num_seg_classes, np.int64)
    index = 0
    for name, n in counts.items():
        a = spec.activities.index(name)
        act_dir = folder / split / str(a + 1)
        if n:
            (act_dir / "image").mkdir(parents=True)
            (act_dir / "mask").mkdir()
        for k in range(n):
            image, mask = render_sample(preset, a, sample_rng(seed, preset, split, a, k), size)
            file = f"{index:06d}.png"
            Image.fromarray(image).save(act_dir / "image" / file, format="PNG", compress_level=_PNG_LEVEL)
            Image.fromarray(mask).save(act_dir / "mask" / file, format="PNG", compress_level=_PNG_LEVEL)
            pixels += np.bincount(mask.ravel(), minlength=spec.num_seg_classes)
            index += 1
    return pixels


def _check_replaceable(root: Path, overwrite: bool) -> None:
    """A non-empty ``root`` may be replaced only when it holds synthetic data generated here and ``overwrite`` is
    set; a real dataset or any other folder is never replaced (FileExistsError saying what to do instead)."""
    held = _read_card(root)
    if not held or not held.get("synthetic"):
        if (root / "train").is_dir() or (root / "test").is_dir():
            raise FileExistsError(
                f"root={str(root)!r} holds a dataset that was not generated here (train/ or test/ without a "
                f"synthetic dataset card): it is never generated over or replaced. To train on it, set "
                f"synthetic=false (keeping data_root); for synthetic data leave data_root unset or give a new folder")
        raise FileExistsError(f"root={str(root)!r} holds files that were not generated here (no synthetic dataset "
                              f"card); they are never replaced (overwrite=True only replaces synthetic data generated "
                              f"here): give a new or empty folder")
    if not overwrite:
        what = {k: held.get(k) for k in _CACHE_KEYS}
        raise FileExistsError(f"root={str(root)!r} already holds other synthetic data ({what}); pass overwrite=True "
                              f"to replace that generated set, or choose another root")


def _publish(tmp: Path, root: Path, card: dict, overwrite: bool) -> None:
    """Rename the finished folder into place; an identical concurrent run that got there first also counts."""
    if overwrite and root.is_dir() and any(root.iterdir()):
        _check_replaceable(root, overwrite)
        trash = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(root, trash)
        os.rename(tmp, root)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        if root.is_dir():
            root.rmdir()  # empty (checked by the caller); fails if another run filled it meanwhile
        os.rename(tmp, root)
    except OSError:
        if not _is_cached(root, card):
            raise FileExistsError(f"root={str(root)!r} was filled by someone else while generating (left as it is); "
                                  f"choose another root") from None


_OWNER = ".generating.json"  # inside a temporary folder while it is written: who writes it (pid, host)


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def remove_stale_partials(root: str | os.PathLike, older_than_s: float = 600.0) -> int:
    """Remove what a killed generation of ``root`` left beside it: its temporary ``.<name>.partial-*`` folders whose
    writer is dead (same machine; or whose owner record is missing and that are older than ``older_than_s``) and the
    ``.<name>.old-*`` folders of an interrupted replacement. Returns how many folders were removed."""
    root = Path(root)
    if not root.parent.is_dir():
        return 0
    removed = 0
    for path in root.parent.glob(f".{root.name}.partial-*"):
        try:
            owner = json.loads((path / _OWNER).read_text())
            host, pid = owner["host"], int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            try:  # no owner record: killed before writing it, or finished and being renamed right now
                stale = time.time() - path.stat().st_mtime > older_than_s and not (path / CARD_NAME).exists()
            except OSError:
                continue
        else:
            stale = host == _owner()["host"] and not process_alive(pid)
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    for path in root.parent.glob(f".{root.name}.old-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def make_synthetic(root, preset: str, seed: int = 0, n_train: int | None = None, n_test: int | None = None,
                   image_size: int = 224, overwrite: bool = False) -> Path:
    """Generate (or find cached) a synthetic dataset in the on-disk layout under ``root``; returns ``root``.

    The set is written into a temporary folder beside ``root`` and renamed into place when complete; what a killed
    generation left there is removed by the next call (:func:`remove_stale_partials`)."""
    preset, seed, size = _check_preset(preset), _check_seed(seed), _check_size(image_size)
    plan = _plan(preset, _split_sizes(preset, n_train, n_test))
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root={str(root)!r} is an existing file; expected a folder (new or generated here)")
    card = _card(preset, seed, size, plan)
    remove_stale_partials(root)  # what a generation killed earlier (kill -9, power loss) left beside root
    if not overwrite and _is_cached(root, card):
        return root
    if root.is_dir() and any(root.iterdir()):
        _check_replaceable(root, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        (tmp / _OWNER).write_text(json.dumps(_owner()))
        for split, counts in plan.items():
            pixels = _write_split(tmp, preset, seed, size, split, counts)
            card["pixel_fraction"][split] = _fractions(preset, pixels)
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        (tmp / _OWNER).unlink()
        _publish(tmp, root, card, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _fractions(preset: str, pixels: np.ndarray) -> dict[str, float]:
    """Share of the split's pixels in each class the preset draws."""
    spec = _spec(preset)
    total = max(int(pixels.sum()), 1)
    return {c: round(float(pixels[spec.seg_classes.index(c)]) / total, 6) for c in preset_classes(preset)}
