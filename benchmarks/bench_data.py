"""Input pipeline benchmark: loader images/s with and without the decoded-image cache.

    python benchmarks/bench_data.py [--source-size 512] [--image-size 224] [--n 48] [--repeats 5] [--workers 0]

Generates a synthetic MTLESD set whose frames are ``--source-size`` px PNGs (larger than the model input, as real
frames are: EndoVis is 1280 x 1024) in a temporary folder, then times full passes of the engine's loader
(``endoarss_lib.data.make_loader``, batch ``--batch-size``) over the training split read at ``--image-size``:

* augment off (validation / test, the paper preset's training): uncached (decode + resize every item) vs cached
  (the model-size arrays: a copy and the normalisation);
* augment on: uncached vs cached (decoded full-size arrays: the crop, resize and colour jitter remain per item).

Prints the median images/s over ``--repeats`` passes (after one warm-up pass that also builds the cache, whose time
is printed separately) and the ratio cached / uncached. The cache makes the same items (tests/test_data_cache.py);
this measures only the speed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from endoarss_lib.data import MTLDataset, make_loader, make_synthetic


def _pass(dataset, batch_size: int, workers: int) -> float:
    """Images/s of one full pass of the loader."""
    loader = make_loader(dataset, batch_size, shuffle=True, seed=0, epoch=0, num_workers=workers)
    start = time.perf_counter()
    n = sum(len(batch["label"]) for batch in loader)
    return n / (time.perf_counter() - start)


def _median_rate(dataset, args) -> float:
    _pass(dataset, args.batch_size, args.workers)  # warm-up: page cache, worker start-up, lazy imports
    return statistics.median(_pass(dataset, args.batch_size, args.workers) for _ in range(args.repeats))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-size", type=int, default=512, help="side of the generated PNG frames (px)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (px)")
    parser.add_argument("--n", type=int, default=48, help="generated training images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (the median is reported)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        started = time.perf_counter()
        root = make_synthetic(Path(tmp) / "esd", "mtlesd", n_train=args.n, n_test=1, image_size=args.source_size)
        print(f"generated {args.n} synthetic {args.source_size}x{args.source_size} PNG frames in "
              f"{time.perf_counter() - started:.1f} s; loader: batch {args.batch_size}, {args.workers} workers, "
              f"{torch.get_num_threads()} torch threads; median of {args.repeats} passes")
        print(f"{'augment':8s} {'uncached img/s':>15s} {'cached img/s':>13s} {'ratio':>7s} {'cache build s':>14s} "
              f"{'cache MiB':>10s}")
        for augment in (False, True):
            def dataset():
                return MTLDataset(root, "train", image_size=args.image_size, val_fraction=0.1, augment=augment)

            uncached = _median_rate(dataset(), args)
            cached_set = dataset()
            started = time.perf_counter()
            folder = cached_set.use_cache(Path(tmp) / "cache", progress=False)
            build = time.perf_counter() - started
            size = sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20
            cached = _median_rate(cached_set, args)
            print(f"{str(augment):8s} {uncached:15.1f} {cached:13.1f} {cached / uncached:6.1f}x {build:14.2f} "
                  f"{size:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
