"""Where a demonstration training step's time goes (CPU), and what makes it faster.

    python benchmarks/bench_training.py [--image-size 224] [--batch 8] [--repeats 5] [--threads 2] [--compile]

The featured configuration (``endoarss_lib.evidence.variants``: frozen ViT + LoRA + TESLA + SMA, EW) on random images:

1. GFLOPs per image by component (FlopCounterMode, forward; a training step is about 2.5x: the frozen backbone's
   backward computes input gradients only);
2. the median time of one training step (forward, losses, backward, optimiser step) in images/s, for the featured
   model and for the model without the segmentation head's detail branch and without SMA, as ratios to the featured
   model measured in the same run (interleaved repeats, medians);
3. the profiler's operators by self CPU time for one featured step (the matmuls vs everything else);
4. with ``--compile``: the same step under ``torch.compile`` (inductor), its compile time and speed ratio.

bf16 is not measured by default on a CPU without native bf16 (AVX-512 BF16 / AMX): it is emulated there and slower.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from endoarss_lib.evidence.variants import FEATURED_MODEL  # noqa: E402
from endoarss_lib.models import build_model, count_gflops  # noqa: E402
from endoarss_lib.training.engine import native_bf16, train_step  # noqa: E402
from endoarss_lib.weighting import get_weighting  # noqa: E402

K, S = 7, 9  # activities and segmentation classes of the synthetic MTLESD


def _model(image_size: int, **changes):
    opts = {**FEATURED_MODEL, **changes}
    backbone, arch, sma = opts.pop("backbone"), opts.pop("arch"), opts.pop("sma")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(backbone, arch, sma=sma, num_activities=K, num_seg_classes=S, image_size=image_size,
                           **opts)


def _batch(batch: int, image_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, image_size, image_size, generator=g),
            "label": torch.randint(0, K, (batch,), generator=g),
            "mask": torch.randint(0, S, (batch, image_size, image_size), generator=g)}


class Stepper:
    """One model, its optimiser and a fixed batch; ``step()`` is one training step."""

    def __init__(self, model, batch: dict, amp: str = "off", compiled: bool = False):
        self.raw = model
        self.model = torch.compile(model) if compiled else model
        self.batch, self.amp = batch, amp
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.weighting = get_weighting("ew")
        self.tasks = list(model.tasks)

    def step(self) -> float:
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        train_step(self.model, self.batch, self.weighting, self.tasks, amp=self.amp)
        self.opt.step()
        return time.perf_counter() - t


def flops(image_size: int) -> None:
    print(f"\n== 1. GFLOPs per image at {image_size} px (forward; FlopCounterMode, 1 MAC = 2 FLOPs) ==")
    for name, changes in (("featured", {}), ("no detail branch", {"seg_detail_channels": 0}),
                          ("no SMA", {"sma": False})):
        g = count_gflops(_model(image_size, **changes), image_size, by_component=True)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in g.items() if k != "total" and v > 0)
        print(f"{name:18s} total {g['total']:6.2f}  ({parts})")


def speed(image_size: int, batch: int, repeats: int, compiled: bool, bf16: bool) -> None:
    data = _batch(batch, image_size)
    steppers = {"featured": Stepper(_model(image_size), data),
                "no detail branch": Stepper(_model(image_size, seg_detail_channels=0), data),
                "no SMA": Stepper(_model(image_size, sma=False), data)}
    if bf16:
        steppers["featured, bf16 autocast"] = Stepper(_model(image_size), data, amp="bf16")
    if compiled:
        torch.manual_seed(0)
        st = Stepper(_model(image_size), data, compiled=True)
        t = time.perf_counter()
        st.step()
        st.step()  # the first two steps compile (forward and backward graphs, then the optimiser's)
        print(f"\ntorch.compile: first two steps took {time.perf_counter() - t:.1f} s (compilation)")
        steppers["featured, torch.compile"] = st
    for st in steppers.values():
        st.step()  # warm-up
    times = {k: [] for k in steppers}
    for _ in range(repeats):  # interleaved, so that the machine's load hits every variant alike
        for k, st in steppers.items():
            times[k].append(st.step())
    base = statistics.median(times["featured"])
    print(f"\n== 2. One training step, batch {batch} at {image_size} px, {torch.get_num_threads()} threads, "
          f"median of {repeats} ==")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:26s} {med:7.3f} s/step  {batch / med:6.2f} images/s  speed x{base / med:5.2f} vs featured")


def profile(image_size: int, batch: int, top: int = 18) -> None:
    st = Stepper(_model(image_size), _batch(batch, image_size))
    st.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        st.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n== 3. Operators by self CPU time, one featured step (total {total / 1e6:.2f} s) ==")
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    mm = sum(e.self_cpu_time_total for e in events if any(s in e.key for s in ("mm", "matmul", "linear",
                                                                              "convolution", "conv2d")))
    for e in rows[:top]:
        print(f"{e.key:45s} {e.self_cpu_time_total / 1e6:7.3f} s  {100 * e.self_cpu_time_total / total:5.1f} %  "
              f"calls {e.count}")
    print(f"matrix products and convolutions (mm / matmul / linear / conv): {100 * mm / total:.1f} % of the step")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile (inductor)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast (emulated without native bf16)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU threads {args.threads}; native bf16: {native_bf16(torch.device('cpu'))}")
    flops(args.image_size)
    speed(args.image_size, args.batch, args.repeats, args.compile, args.bf16)
    profile(args.image_size, args.batch)


if __name__ == "__main__":
    main()
