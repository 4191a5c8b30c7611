"""Training-step time of each weighting method relative to EW on the same model, and the memory they need.

Gradient methods build a T x P matrix of task gradients over the **trainable shared** parameters only; the released
code flattened every encoder parameter (about 93 M, almost all frozen), about 1.5 GB of buffers for DB-MTL.
Usage: python benchmarks/bench_weighting.py [--backbone vit_tiny_patch14] [--image-size 112] [--steps 6]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from endoarss_lib.losses import task_losses
from endoarss_lib.models import build_model
from endoarss_lib.weighting import available_weightings, get_weighting

warnings.filterwarnings("ignore")


def step_time(model, weighting, batch, steps: int) -> float:
    """Median seconds of forward + weighting backward + Adam step."""
    shared = model.trainable_shared_parameters()
    heads = [model.task_specific_parameters(t) for t in ("cls", "seg")]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(batch["image"])
        raw = task_losses(out, batch, ("cls", "seg"))
        weighting.backward(torch.stack([raw["cls"], raw["seg"]]), shared, heads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def buffer_table() -> None:
    """Task-gradient buffer sizes (T = 2, fp32) for the paper model: ours versus the released code's."""
    print("\nTask-gradient buffer per step (T = 2, fp32), paper-size models at 224 px, random init:")
    print(f"{'model':34s} {'trainable shared P':>18s} {'ours MB':>9s} {'all encoder params':>19s} {'released MB':>12s}")
    for backbone, arch, sma in (("dinov2_vitb14", "tesla", True), ("dinov2_vitb14", "hps", False)):
        model = build_model(backbone=backbone, arch=arch, sma=sma, num_activities=3, num_seg_classes=7)
        shared = sum(p.numel() for p in model.trainable_shared_parameters())
        encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("heads"))
        name = f"{backbone} {arch}{' + SMA' if sma else ''}"
        print(f"{name:34s} {shared:18,d} {2 * shared * 4 / 2**20:9.2f} {encoder:19,d} {2 * encoder * 4 / 2**20:12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="vit_tiny_patch14")
    parser.add_argument("--arch", default="tesla")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model(backbone=args.backbone, arch=args.arch, num_activities=3, num_seg_classes=7,
                        image_size=args.image_size)
    batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size),
             "label": torch.randint(0, 3, (args.batch,)),
             "mask": torch.randint(0, 7, (args.batch, args.image_size, args.image_size))}
    p = sum(x.numel() for x in model.trainable_shared_parameters())
    print(f"{args.backbone} {args.arch} at {args.image_size} px, batch {args.batch}, CPU threads 2; "
          f"trainable shared P = {p:,d}")
    base = None
    print(f"{'weighting':12s} {'ms/step':>9s} {'vs EW':>7s} {'task-grad buffer MB':>20s}")
    for name in available_weightings():
        w = get_weighting(name, **({"warmup_epochs": 1} if name == "stch" else {}))
        w.set_epoch(0, 2)
        seconds = step_time(model, w, batch, args.steps)
        base = base or seconds
        buffer = 2 * p * 4 / 2**20 if w.needs_task_grads else 0.0
        print(f"{name:12s} {seconds * 1e3:9.1f} {seconds / base:7.2f} {buffer:20.3f}")
    buffer_table()


if __name__ == "__main__":
    main()
