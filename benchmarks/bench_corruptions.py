"""Seconds per 224x224 image of each of the 19 corruptions at severity 3 (median of a few reps), on this CPU."""
import argparse
import time

import numpy as np
from skimage import data, transform

from endoarss_lib.robustness.corruptions import CORRUPTION_GROUPS, corrupt


def main(reps: int = 5, size: int = 224, severity: int = 3) -> None:
    image = (transform.resize(data.astronaut(), (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    print(f"{'group':10s} {'corruption':18s} {'ms/image':>9s}   (severity {severity}, {size}x{size}, median of "
          f"{reps}, one process)")
    total = 0.0
    for group, names in CORRUPTION_GROUPS.items():
        for name in names:
            corrupt(image, name, severity, seed=0)  # warm-up: glass_blur compiles its numba kernel once
            times = []
            for rep in range(reps):
                start = time.perf_counter()
                corrupt(image, name, severity, seed=rep)
                times.append(time.perf_counter() - start)
            total += float(np.median(times))
            print(f"{group:10s} {name:18s} {np.median(times) * 1e3:9.2f}")
    print(f"{'all 19':29s} {total * 1e3:9.2f}  (one image through every corruption once)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--severity", type=int, default=3)
    main(**vars(parser.parse_args()))
