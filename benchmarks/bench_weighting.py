"""Training-step time of each weighting method relative to EW on the same model, and the memory they need.

Gradient methods build a T x P matrix of task gradients over the **trainable shared** parameters only; the released
code flattened every encoder parameter (about 93 M, almost all frozen), about 1.5 GB of buffers for DB-MTL.

A step is forward + the method's ``backward`` + Adam. Methods with per-task gradients are timed three ways, in the
same process, interleaved (one step of every variant per round, medians over the rounds, so the machine's load
drifts alike for all):

* ``legacy``: the per-task gradients as before issue 16 -- ``autograd.grad(stack(L)[t], shared)`` per task (each
  backward also runs through the other tasks' branches with zero gradients), then a further backward of the heads'
  objective into the task-specific parameters;
* ``loop``: :func:`endoarss_lib.weighting.task_grads.task_gradients` with ``mode="loop"`` (the default): one backward
  per task from the task's own loss, shared parameters and heads in the same backward;
* ``batched``: ``mode="batched"``: one vmapped backward (``is_grads_batched``) for all tasks.

Usage: python benchmarks/bench_weighting.py [--backbone vit_tiny_patch14] [--arch tesla] [--image-size 112]
       [--batch 8] [--sma [--sma-dim 64]] [--rounds 9] [--threads 1] [--no-buffers]
One thread by default: on a shared machine, a descheduled intra-op thread stalls every op and makes 2-thread timings
swing by several times.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from endoarss_lib.models import build_model
from endoarss_lib.training.losses import task_losses
from endoarss_lib.weighting import available_weightings, get_weighting
from endoarss_lib.weighting.base import GradWeighting, _add_grad, _unique_trainable, backward_task_specific
from endoarss_lib.weighting.task_grads import batching_failure, rows_matrix, set_default_mode

warnings.filterwarnings("ignore")
TASKS = ("cls", "seg")


def legacy_backward(weighting: GradWeighting, losses: torch.Tensor, shared, heads) -> torch.Tensor:
    """GradWeighting.backward as it was before issue 16 (for the before/after comparison only)."""
    shared = _unique_trainable(shared, "shared")
    heads = _unique_trainable([p for h in heads for p in h], "heads")
    rows = []
    for t in range(losses.numel()):
        g = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
        rows.append([(gi,) for gi in g])
    grads = torch.cat([rows_matrix(list(r), shared) for r in rows])  # (T, P)
    with torch.no_grad():
        shared_grad, weights = weighting.combine(grads, losses.detach())
    backward_task_specific(weighting.combine_losses(losses), shared, heads)
    with torch.no_grad():
        off = 0
        for p in shared:
            _add_grad(p, shared_grad[off:off + p.numel()].view(p.shape))
            off += p.numel()
    return weights


class Variant:
    """One timed configuration: a weighting method and how its per-task gradients are computed."""

    def __init__(self, label: str, method: str, mode: str | None, hparams: dict | None = None):
        self.label, self.mode = label, mode
        self.weighting = get_weighting(method, **(hparams or {}))
        self.weighting.set_epoch(0, 2)
        self.times: list[float] = []

    def step(self, model, batch, opt) -> None:
        shared = model.trainable_shared_parameters()
        heads = [model.task_specific_parameters(t) for t in TASKS]
        start = time.perf_counter()
        out = model(batch["image"])
        raw = task_losses(out, batch, TASKS)
        losses = torch.stack([raw[t] for t in TASKS])
        if self.mode == "legacy":
            legacy_backward(self.weighting, losses, shared, heads)
        else:
            set_default_mode(self.mode or "auto")
            self.weighting.backward(losses, shared, heads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.times[1:])  # the first step warms up


def variants() -> list[Variant]:
    out = []
    for name in available_weightings():
        hp = {"warmup_epochs": 1} if name == "STCH" else {}
        if get_weighting(name, **hp).needs_task_grads:
            out += [Variant(f"{name} [{m}]", name, m, hp) for m in ("legacy", "loop", "batched")]
        else:
            out.append(Variant(name, name, None, hp))
    # GM-Coord acting on the shared gradients only needs per-task gradients too.
    hp = {"apply_to": "shared"}
    out += [Variant(f"GM-Coord/shared [{m}]", "GM-Coord", m, hp) for m in ("loop", "batched")]
    return out


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_tiny_patch14")
    parser.add_argument("--arch", default="tesla")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sma", action="store_true", help="SMA in front of the backbone (d = --sma-dim)")
    parser.add_argument("--sma-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per variant (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-buffers", action="store_true", help="skip the paper-size buffer table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(backbone=args.backbone, arch=args.arch, num_activities=3, num_seg_classes=7,
                        image_size=args.image_size, sma=args.sma, **({"sma_dim": args.sma_dim} if args.sma else {}))
    batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size),
             "label": torch.randint(0, 3, (args.batch,)),
             "mask": torch.randint(0, 7, (args.batch, args.image_size, args.image_size))}
    p = sum(x.numel() for x in model.trainable_shared_parameters())
    sma = f" + SMA d={args.sma_dim}" if args.sma else ""
    print(f"{args.backbone} {args.arch}{sma} at {args.image_size} px, batch {args.batch}, CPU threads {args.threads}; "
          f"trainable shared P = {p:,d}; median of {args.rounds} interleaved steps")
    opt = torch.optim.Adam([x for x in model.parameters() if x.requires_grad], lr=0.0)  # lr 0: same model each step
    runs = variants()
    for _ in range(args.rounds + 1):
        for v in runs:
            v.step(model, batch, opt)
    set_default_mode("auto")
    base = next(v for v in runs if v.label == "EW").median
    legacy = {v.label.split(" [")[0]: v.median for v in runs if v.mode == "legacy"}
    print(f"{'weighting':26s} {'ms/step':>9s} {'vs EW':>7s} {'vs legacy':>10s} {'task-grad buffer MB':>20s}")
    for v in runs:
        buffer = 2 * p * 4 / 2**20 if v.weighting.needs_task_grads else 0.0
        old = legacy.get(v.label.split(" [")[0])
        rel = f"{v.median / old:10.2f}" if old and v.mode != "legacy" else f"{'':10s}"
        print(f"{v.label:26s} {v.median * 1e3:9.1f} {v.median / base:7.2f} {rel} {buffer:20.3f}")
    params = model.trainable_shared_parameters() + [x for t in TASKS for x in model.task_specific_parameters(t)]
    failure = batching_failure(params)
    print("batched backward: " + (f"FELL BACK to the loop ({failure})" if failure else "ran batched (no fallback)"))
    if not args.no_buffers:
        buffer_table()


if __name__ == "__main__":
    main()
