"""The paper's 19 image corruptions x 5 severities (Sec. IV-C5, Table VII, Fig. 6): pixel transforms only.

The cached, parallel builder of whole corrupted test sets is :mod:`endoarss_lib.robustness.corrupted_sets`.

Fifteen corruptions come from the ``imagecorruptions`` package (Michaelis et al. 2019, maintained fork
``imagecorruptions-imaug``), which packages ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019). ``elastic_transform`` uses that package's parameter
schedule and random draws but is implemented here, because the package hides its displacement field and the mask must
be warped with the same field. ``bleeding``, ``smoke`` and ``gamma`` are ours, with the explicit, monotone schedules
below (``BLEEDING_SCHEDULE``, ``SMOKE_SCHEDULE``, ``GAMMA_SCHEDULE``).

Every corruption is seeded: ``corrupt(image, name, severity, seed)`` returns the same bytes for the same arguments.
The same seed at different severities reuses the same random draws (common random numbers), so damage grows with
severity image by image, not only on average. Package corruptions draw from numpy's legacy global RNG, which is
seeded for the call and restored afterwards: not thread-safe; parallelise over processes (the builder does).
"""
from __future__ import annotations

import contextlib
import inspect
import re
from importlib import metadata
from typing import Iterator, Mapping

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage.filters import gaussian

__all__ = ["CORRUPTIONS", "CORRUPTION_GROUPS", "SEVERITIES", "OURS", "GEOMETRIC", "DETERMINISTIC",
           "BLEEDING_SCHEDULE", "SMOKE_SCHEDULE", "GAMMA_SCHEDULE", "ELASTIC_SCHEDULE", "GENERATOR_VERSION",
           "corrupt", "severity_schedule", "check_name", "check_severity", "check_seed", "package_version",
           "check_names", "check_severities", "GROUP_OF",
           "MIN_SIDE"]

GENERATOR_VERSION = "1.0"  # bump whenever our corruptions or schedules change the pixels for the same arguments
SEVERITIES = (1, 2, 3, 4, 5)

# Grouping of the paper's text (Sec. IV-C5).
CORRUPTION_GROUPS: Mapping[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "gaussian_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "occlusion": ("bleeding", "brightness", "smoke", "spatter"),
    "digital": ("contrast", "elastic_transform", "gamma", "jpeg_compression", "pixelate", "saturate"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for group in CORRUPTION_GROUPS.values() for name in group)
GROUP_OF: Mapping[str, str] = {name: group for group, names in CORRUPTION_GROUPS.items() for name in names}
OURS = ("bleeding", "smoke", "gamma")
GEOMETRIC = ("elastic_transform",)  # move pixels: the mask is warped with the same field
# Output independent of the seed (no random draws).
DETERMINISTIC = ("defocus_blur", "gaussian_blur", "zoom_blur", "brightness", "contrast", "gamma",
                 "jpeg_compression", "pixelate", "saturate")

# Package corruptions that take a seed argument; the others draw from numpy's legacy global RNG.
_SEED_ARGUMENT = ("impulse_noise", "glass_blur")
MIN_SIDE = _MIN_SIDE = 32  # the package refuses smaller images

# ---- our schedules (radii and lengths are fractions of the image's short side, so they hold at any resolution) ----

# Blood droplets with soft edges, some with a drip streak. The released code's single level (36 droplets, radius 10-32
# px at 256 px) is severity 5. Droplet i keeps its centre and shape at every severity and only grows, so the bleeding
# area is nested: it can only increase with severity.
BLEEDING_SCHEDULE: Mapping[int, dict] = {
    1: dict(count=8, radius=(0.020, 0.060), opacity=0.60),
    2: dict(count=14, radius=(0.025, 0.075), opacity=0.67),
    3: dict(count=20, radius=(0.030, 0.090), opacity=0.74),
    4: dict(count=28, radius=(0.035, 0.105), opacity=0.81),
    5: dict(count=36, radius=(0.039, 0.125), opacity=0.88),
}
BLOOD_RGB = np.array([125.0, 8.0, 12.0], np.float32)  # dark venous red; lit by a smooth texture in 0.7..1.0
_BLOOD_EDGE = 0.006  # sigma of the soft edge, fraction of the short side (1.3 px at 224 px)
_STREAK_PROBABILITY = 0.5

# Surgical smoke: a whitish-grey haze of fractal noise. Opacity = density * (1 - v + v * noise) with v = variation,
# plus a light blur (light scattered in the smoke). Both grow with severity, so contrast only falls.
SMOKE_SCHEDULE: Mapping[int, dict] = {
    1: dict(density=0.30, scatter=0.002),
    2: dict(density=0.45, scatter=0.004),
    3: dict(density=0.60, scatter=0.006),
    4: dict(density=0.72, scatter=0.008),
    5: dict(density=0.84, scatter=0.010),
}
SMOKE_RGB = np.array([218.0, 218.0, 224.0], np.float32)
_SMOKE_VARIATION = 0.5

# I' = I ** gamma on [0, 1]. Darkening only (gamma > 1, under-exposure far from the light source; brightening is the
# 'brightness' corruption), so damage grows with severity pixel by pixel. The released list (1.6, 1.4, 1.2, 0.8, 0.6)
# mixes both directions and is not monotone in damage.
GAMMA_SCHEDULE: Mapping[int, dict] = {1: dict(gamma=1.3), 2: dict(gamma=1.6), 3: dict(gamma=2.0),
                                      4: dict(gamma=2.5), 5: dict(gamma=3.0)}

# The package's elastic_transform (ImageNet-C variant without the affine step): uniform noise in +-max_shift * H,
# Gaussian-smoothed with sigma = sigma_frac * (H, W), scaled by alpha; bilinear resampling, 'reflect' borders.
ELASTIC_SCHEDULE: Mapping[int, dict] = {
    s: dict(alpha=250 * a, sigma_frac=0.01, max_shift_frac=0.005)
    for s, a in zip(SEVERITIES, (0.05, 0.065, 0.085, 0.1, 0.12))
}


# ---------------------------------------------------------------------------------------------- public API: corrupt

def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0, mask: np.ndarray | None = None):
    """Corrupted copy of a uint8 HxWx3 image; with a mask, the tuple (image, mask) with the mask moved alike."""
    check_name(name)
    check_severity(severity)
    _check_image(image)
    check_seed(seed)
    if mask is not None:
        _check_mask(mask, image)
    if name == "elastic_transform":
        out, new_mask = _elastic(image, severity, seed, mask)
    else:
        out = _OWN[name](image, severity, seed) if name in _OWN else _package(image, name, severity, seed)
        new_mask = None if mask is None else mask.copy()  # photometric: the truth does not move
    return out if mask is None else (out, new_mask)


def severity_schedule(name: str) -> dict[int, dict] | str:
    """Per-severity parameters of ``name``: a table for ours and elastic, a note with the source for package ones."""
    check_name(name)
    tables = {"bleeding": BLEEDING_SCHEDULE, "smoke": SMOKE_SCHEDULE, "gamma": GAMMA_SCHEDULE,
              "elastic_transform": ELASTIC_SCHEDULE}
    if name in tables:
        return {s: dict(p) for s, p in tables[name].items()}
    return (f"imagecorruptions-imaug {package_version()} `{name}` (ImageNet-C schedule, indexed by severity - 1): "
            f"{_package_parameters(name)}")


# ----------------------------------------------------------------------------------------------------- validation

def check_name(name) -> None:
    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise ValueError(f"name={name!r}: unknown corruption; valid names: {', '.join(CORRUPTIONS)}")


def check_severity(severity) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r}: expected an integer in 1..5")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")


def _check_image(image) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image.dtype={image.dtype}: expected uint8 (0..255, before normalisation)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image.shape={image.shape}: expected (H, W, 3) RGB")
    if min(image.shape[:2]) < _MIN_SIDE:
        raise ValueError(f"image.shape={image.shape}: height and width must be at least {_MIN_SIDE} pixels")


def _check_mask(mask, image) -> None:
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask: expected a numpy array, got {type(mask).__name__}")
    if mask.ndim not in (2, 3) or mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"mask.shape={mask.shape}: expected (H, W) or (H, W, C) with the image's H, W = "
                         f"{image.shape[:2]}")


# ------------------------------------------------------------------------------------------- package corruptions

def _legacy_seed(seed: int) -> int:
    """A well-mixed 32-bit seed for numpy's legacy RNG (which only takes 0 .. 2**32 - 1)."""
    return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's legacy global RNG for the block, then restore the caller's state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _package(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One ``imagecorruptions`` corruption, seeded, converted like ``imagecorruptions.corrupt`` (clip, truncate)."""
    from imagecorruptions import corruption_dict

    legacy = _legacy_seed(seed)
    kwargs = {"seed": legacy} if name in _SEED_ARGUMENT else {}
    # spatter divides 0 / 0 when no liquid lands on a small image: silence it and keep those pixels clean below
    with _global_numpy_seed(legacy), np.errstate(invalid="ignore", divide="ignore"):
        out = np.asarray(corruption_dict[name](Image.fromarray(image), severity, **kwargs), dtype=np.float32)
    out = np.where(np.isfinite(out), out, image)
    return np.clip(out, 0, 255).astype(np.uint8)


def package_version() -> str:
    try:
        return metadata.version("imagecorruptions-imaug")
    except metadata.PackageNotFoundError:
        return "unknown"


def _package_parameters(name: str) -> str:
    """The parameter table ``c = [...]`` from the package's source, so notebooks show the real numbers."""
    from imagecorruptions import corruption_dict

    source = " ".join(inspect.getsource(corruption_dict[name]).split())
    found = re.search(r"c = (\[.*?\])\[ ?severity - 1\]", source)
    return f"c = {found.group(1)}" if found else "see imagecorruptions/corruptions.py"


# ------------------------------------------------------------------------------------ elastic transform (geometric)

def _elastic(image: np.ndarray, severity: int, seed: int, mask: np.ndarray | None):
    """The package's elastic_transform with its field exposed: image bilinear, mask nearest, same field."""
    rows, cols = _elastic_coordinates(image.shape[:2], severity, _legacy_seed(seed))
    warped = np.stack([map_coordinates(image[..., c] / np.float32(255), (rows, cols), order=1, mode="reflect")
                       for c in range(3)], axis=-1)
    out = (np.clip(warped, 0, 1) * 255).astype(np.uint8)  # truncation, as the package's corrupt() does
    return out, (None if mask is None else _warp_nearest(mask, rows, cols))


def _elastic_coordinates(shape: tuple[int, int], severity: int, legacy_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates (rows, cols) for every output pixel; the same draws as the package under the same seed."""
    p = ELASTIC_SCHEDULE[severity]
    rng = np.random.RandomState(legacy_seed)  # = np.random.seed(legacy_seed) then the package's np.random calls
    sigma = np.array(shape) * p["sigma_frac"]
    max_shift = shape[0] * p["max_shift_frac"]  # the package uses the height for both axes
    dx = (gaussian(rng.uniform(-max_shift, max_shift, size=shape), sigma, mode="reflect", truncate=3)
          * p["alpha"]).astype(np.float32)
    dy = (gaussian(rng.uniform(-max_shift, max_shift, size=shape), sigma, mode="reflect", truncate=3)
          * p["alpha"]).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return rows + dy, cols + dx


def _warp_nearest(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Resample a label mask at the given coordinates without mixing labels (nearest neighbour)."""
    planes = mask[..., None] if mask.ndim == 2 else mask
    source = planes.astype(np.int64) if planes.dtype == bool else planes
    out = np.stack([map_coordinates(source[..., c], (rows, cols), order=0, mode="reflect")
                    for c in range(source.shape[-1])], axis=-1).astype(mask.dtype)
    return out[..., 0] if mask.ndim == 2 else out


# ---------------------------------------------------------------------------------------------- our corruptions

def _fractal_noise(shape: tuple[int, int], rng: np.random.Generator, octaves: int) -> np.ndarray:
    """Smooth multi-scale noise in [0, 1]: coarse Gaussian grids upsampled (bicubic), finer octaves weaker."""
    h, w = shape
    short = min(h, w)
    field = np.zeros(shape, np.float32)
    for octave in range(octaves):
        cells = 2 ** (octave + 1)
        grid = rng.standard_normal((cells * h // short + 2, cells * w // short + 2)).astype(np.float32)
        field += 0.5 ** octave * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.min()) / max(float(field.max() - field.min()), 1e-6)


def _gamma(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Darken by I ** gamma (deterministic; the seed is unused)."""
    lut = np.round(255 * (np.arange(256) / 255.0) ** GAMMA_SCHEDULE[severity]["gamma"]).astype(np.uint8)
    return lut[image]


def _smoke(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Blend toward a grey-white haze whose opacity varies smoothly; blur a little for scattering."""
    p = SMOKE_SCHEDULE[severity]
    field = _fractal_noise(image.shape[:2], np.random.default_rng(seed), octaves=5)
    alpha = (p["density"] * (1 - _SMOKE_VARIATION + _SMOKE_VARIATION * field))[..., None]
    scattered = cv2.GaussianBlur(image.astype(np.float32), (0, 0), p["scatter"] * min(image.shape[:2]))
    return _to_uint8((1 - alpha) * scattered + alpha * SMOKE_RGB)


def _bleeding(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Blend soft-edged dark-red droplets and drips onto the image; more, larger and more opaque with severity."""
    p = BLEEDING_SCHEDULE[severity]
    rng = np.random.default_rng(seed)
    drops = _draw_droplets(rng, BLEEDING_SCHEDULE[5]["count"])  # all drawn at every severity: same draws, nested
    shade = 0.7 + 0.3 * _fractal_noise(image.shape[:2], rng, octaves=4)
    cover = _blood_cover(image.shape[:2], drops, p["count"], p["radius"])
    alpha = (p["opacity"] * cover)[..., None]
    return _to_uint8((1 - alpha) * image + alpha * shade[..., None] * BLOOD_RGB)


def _draw_droplets(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Positions (fractions of H, W), size ranks, wobbly outlines and drip streaks of ``n`` droplets."""
    return dict(
        centre=rng.random((n, 2)),
        size=rng.random(n),  # where the radius lies in the severity's (min, max) range
        wobble=rng.uniform(0.0, 0.12, (n, 3)),  # amplitudes of the 2nd-4th harmonics of the outline
        phase=rng.uniform(0.0, 2 * np.pi, (n, 3)),
        streak=rng.random(n) < _STREAK_PROBABILITY,
        streak_length=rng.uniform(1.5, 3.5, n),  # in radii
        streak_angle=np.pi / 2 + rng.uniform(-0.5, 0.5, n),  # mostly downward in image coordinates
    )


def _blood_cover(shape: tuple[int, int], drops: dict, count: int, radius: tuple[float, float]) -> np.ndarray:
    """Soft coverage in [0, 1] of the first ``count`` droplets at the given radius range."""
    short = min(shape)
    covered = np.zeros(shape, bool)
    for i in range(count):
        r = short * (radius[0] + drops["size"][i] * (radius[1] - radius[0]))
        _stamp_droplet(covered, drops, i, r)
    return np.clip(cv2.GaussianBlur(covered.astype(np.float32), (0, 0), _BLOOD_EDGE * short), 0, 1)


def _stamp_droplet(covered: np.ndarray, drops: dict, i: int, r: float) -> None:
    """Mark droplet ``i`` of radius ``r`` (a wobbly disc plus an optional tapering drip) inside its bounding box."""
    h, w = covered.shape
    cy, cx = drops["centre"][i] * (h, w)
    reach = r * (1.4 + (drops["streak_length"][i] if drops["streak"][i] else 0.0))
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)[..., None]
    outline = r * (1 + np.sum(drops["wobble"][i] * np.cos(np.arange(2, 5) * theta + drops["phase"][i]), -1))
    inside = np.hypot(dy, dx) <= outline
    if drops["streak"][i]:
        inside |= _inside_streak(dy, dx, r, drops["streak_length"][i] * r, drops["streak_angle"][i])
    covered[y0:y1, x0:x1] |= inside


def _inside_streak(dy: np.ndarray, dx: np.ndarray, r: float, length: float, angle: float) -> np.ndarray:
    """Pixels of a drip leaving the droplet centre along ``angle``, half-width tapering from 0.45 r to 0.15 r."""
    along = dx * np.cos(angle) + dy * np.sin(angle)
    t = np.clip(along / length, 0, 1)
    across = np.hypot(dx - t * length * np.cos(angle), dy - t * length * np.sin(angle))
    return (along >= 0) & (along <= length) & (across <= r * (0.45 - 0.3 * t))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


_OWN = {"gamma": _gamma, "smoke": _smoke, "bleeding": _bleeding}


def check_names(names) -> tuple[str, ...]:
    """A corruption name or list of names, checked (known, not repeated), as a tuple."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("names: expected at least one corruption name")
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"names: unknown corruption(s) {unknown}; valid names: {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names={list(names)}: a corruption is listed twice")
    return names


def check_severities(severities) -> tuple[int, ...]:
    """A severity or list of severities, checked (in 1..5, not repeated), as a tuple of ints."""
    severities = (severities,) if isinstance(severities, (int, np.integer)) else tuple(severities)
    if not severities:
        raise ValueError("severities: expected at least one severity in 1..5")
    bad = [s for s in severities if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s not in SEVERITIES]
    if bad:
        raise ValueError(f"severities: {bad} not in 1..5")
    if len(set(severities)) != len(severities):
        raise ValueError(f"severities={list(severities)}: a severity is listed twice")
    return tuple(int(s) for s in severities)


# Former private names (kept for callers that used them).
_check_name, _check_severity, _check_seed, _package_version = check_name, check_severity, check_seed, package_version
