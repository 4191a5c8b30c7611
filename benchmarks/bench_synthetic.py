"""Throughput of the synthetic generator on one core: render_sample alone, and make_synthetic with its PNG writes.

    python benchmarks/bench_synthetic.py [--size 224] [--n 240] [--repeats 3] [--montage-dir /tmp]

With ``--montage-dir`` it also saves ``synthetic_montage_<preset>.png`` there: a few samples per preset, each image
above its mask overlay, labelled with the activity.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, set before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from endoarss_lib.data import synthetic as syn  # noqa: E402
from endoarss_lib.data.registry import DATASETS, SYNTHETIC_PRESETS  # noqa: E402

# Overlay colour per train id (0 = background is left unpainted).
PALETTE = np.array([[0, 0, 0], [255, 40, 40], [40, 220, 40], [40, 90, 255], [255, 230, 0], [255, 0, 255],
                    [0, 230, 230], [255, 140, 0]], np.uint8)


def _samples(preset: str, n: int, size: int):
    """``n`` (activity id, rng) pairs cycling over the preset's activities."""
    spec = DATASETS[SYNTHETIC_PRESETS[preset]]
    ids = [spec.activities.index(a) for a in syn.preset_activities(preset)]
    return [(ids[i % len(ids)], syn.sample_rng(0, preset, "train", ids[i % len(ids)], i // len(ids)))
            for i in range(n)]


def bench_render(preset: str, n: int, size: int, repeats: int) -> float:
    """Best images/s of render_sample over ``repeats`` runs of ``n`` images."""
    best = 0.0
    for _ in range(repeats):
        work = _samples(preset, n, size)
        start = time.perf_counter()
        for activity, rng in work:
            syn.render_sample(preset, activity, rng, size)
        best = max(best, n / (time.perf_counter() - start))
    return best


def bench_make(preset: str, n: int, size: int, repeats: int) -> float:
    """Best images/s of make_synthetic (``n`` train images, PNG image + mask writes, card, atomic rename)."""
    best = 0.0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            syn.make_synthetic(Path(tmp) / "d", preset, n_train=n, n_test=0, image_size=size)
            best = max(best, n / (time.perf_counter() - start))
    return best


def save_montage(preset: str, path: Path, width: int = 600, per_activity: int = 2) -> Path:
    """A grid of samples (image above its mask overlay), labelled with the activity."""
    spec = DATASETS[SYNTHETIC_PRESETS[preset]]
    names = syn.preset_activities(preset)
    if len(names) > 6:
        per_activity = 1
    cols = 3 if len(names) * per_activity in (3, 6) else 4
    tile = width // cols
    tiles = []
    for k in range(per_activity):
        for name in names:
            a = spec.activities.index(name)
            image, mask = syn.render_sample(preset, a, syn.sample_rng(0, preset, "train", a, k), tile)
            overlay = image.copy()
            sel = mask > 0
            overlay[sel] = (0.4 * image[sel] + 0.6 * PALETTE[mask[sel]]).astype(np.uint8)
            pair = Image.fromarray(np.concatenate([image, overlay], axis=0))
            ImageDraw.Draw(pair).text((4, 2), name, fill=(255, 255, 255))
            tiles.append(pair)
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * tile, rows * 2 * tile), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * tile, (i // cols) * 2 * tile))
    sheet.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=240, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (the machine is shared)")
    parser.add_argument("--presets", nargs="+", default=list(syn.DEFAULT_COUNTS))
    parser.add_argument("--montage-dir", type=Path, default=None)
    args = parser.parse_args()
    print(f"synthetic generator {syn.GENERATOR_VERSION}, {args.size}x{args.size}, n={args.n}, best of "
          f"{args.repeats}, 1 thread")
    for preset in args.presets:
        render = bench_render(preset, args.n, args.size, args.repeats)
        make = bench_make(preset, args.n, args.size, args.repeats)
        print(f"{preset:>15}: render_sample {render:6.0f} img/s | make_synthetic incl. PNG writes {make:6.0f} img/s")
        if args.montage_dir is not None:
            print(f"{'':>15}  montage: {save_montage(preset, args.montage_dir / f'synthetic_montage_{preset}.png')}")


if __name__ == "__main__":
    main()
