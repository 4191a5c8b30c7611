"""Model cost benchmark (CPU): parameters per component, GFLOPs per image, SMA share, forward time, TESLA batching.

    python benchmarks/bench_models.py [--quick]

1. For DINOv2 ViT-B/14 and ViT-S/14 (random init; parameter counts and FLOPs do not depend on the weights) at 224 px:
   parameters total / trainable per component and GFLOPs per image (FlopCounterMode: 1 multiply-add = 2 FLOPs,
   element-wise ops not counted), HPS and TESLA, with and without SMA (d = 512, the default fused implementation:
   about 1.3 GFLOPs; the reference modules: 23.1), SMA's share, and the size of the unfolded tensor the reference
   implementation materialises per image ('unfold MB').
2. CPU forward time per image (2 threads, batch 4) of the tiny test model and ViT-S/14 at 224 px.
3. TESLA: one batched pass over the task-concatenated batch vs a Python loop over tasks (same model, same inputs),
   inference and a training step, adapters in all blocks and in the last 4 only.
Runs in about 2-4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from endoarss_lib.models import RandomInitWarning, build_model, count_gflops

K, S = 3, 10


def _model(backbone, arch="hps", sma=False, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        return build_model(backbone, arch, sma=sma, num_activities=K, num_seg_classes=S, **kw)


def _m(n: int) -> str:
    return f"{n / 1e6:8.3f}"


def cost_table(backbones, image_size=224):
    print(f"\n== 1. Parameters (M, total/trainable) and GFLOPs per image at {image_size} px "
          "(FlopCounterMode, 1 MAC = 2 FLOPs) ==")
    comps = ("backbone", "sma", "lora", "tesla", "head.cls", "head.seg", "total")
    hdr = f"{'backbone':14s} {'arch':6s} {'sma':5s} " + " ".join(f"{c:>19s}" for c in comps)
    print(hdr + f" {'GFLOPs':>8s} {'SMA GF':>7s} {'SMA %':>6s} {'unfold MB':>10s}")
    for bb in backbones:
        for arch in ("hps", "tesla"):
            for sma in (False, True):
                model = _model(bb, arch, sma, image_size=image_size)
                rep = model.parameter_report()
                cells = []
                for c in comps:
                    r = rep.get(c)
                    cells.append(f"{'-':>19s}" if r is None else f"{_m(r['total'])}/{_m(r['trainable'])}")
                act = []
                if sma:  # size of the unfolded (B, P, N, d) tensor the reference EMA works on, per image (fp32);
                    # the default fused SMA never materialises it (see bench_sma.py)
                    act.append(model.backbone.sma.dim * image_size ** 2 * 4 / 2**20)
                g = count_gflops(model, image_size, by_component=True)
                share = 100 * g["sma"] / g["total"]
                print(f"{bb:14s} {arch:6s} {str(sma):5s} " + " ".join(cells)
                      + f" {g['total']:8.2f} {g['sma']:7.2f} {share:6.1f} {(act[0] if act else 0):10.1f}")
                del model


def _time(fn, reps):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def forward_time(specs, batch=4, reps=3, image_size=224):
    print(f"\n== 2. CPU forward time ({torch.get_num_threads()} threads, batch {batch}, {image_size} px, eval, "
          "no_grad) ==")
    print(f"{'model':34s} {'ms/img':>8s} {'img/s':>7s}")
    x = torch.randn(batch, 3, image_size, image_size)
    for bb, arch, sma in specs:
        model = _model(bb, arch, sma, image_size=image_size).eval()
        with torch.no_grad():
            dt = _time(lambda: model(x), reps) / batch
        print(f"{bb + ' ' + arch + (' +SMA(d=512)' if sma else ''):34s} {1e3 * dt:8.1f} {1 / dt:7.2f}")


def tesla_ratio(backbone="dinov2_vits14", batch=4, reps=3, image_size=224, last_ks=(None, 4)):
    print(f"\n== 3. TESLA: batched pass vs per-task loop ({backbone}, batch {batch}, {image_size} px) ==")
    print(f"{'adapters':10s} {'mode':10s} {'batched ms':>11s} {'loop ms':>9s} {'loop/batched':>13s} "
          f"{'max |diff|':>11s}")
    x = torch.randn(batch, 3, image_size, image_size)
    yc = torch.randint(0, K, (batch,))
    ys = torch.randint(0, S, (batch, image_size, image_size))
    for last_k in last_ks:
        model = _model(backbone, "tesla", tesla_last_k=last_k, image_size=image_size, seg_dropout=0.0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("_B.0", "_B.1", "lora_B")):
                    p.normal_(0, 0.02)
        label = "all" if last_k is None else f"last {last_k}"
        model.eval()
        with torch.no_grad():
            a, b = model(x), model.forward_per_task(x)
            diff = max((a[t] - b[t]).abs().max().item() for t in a)
            tb = _time(lambda: model(x), reps)
            tl = _time(lambda: model.forward_per_task(x), reps)
        print(f"{label:10s} {'inference':10s} {1e3 * tb:11.1f} {1e3 * tl:9.1f} {tl / tb:13.2f} {diff:11.2e}")
        model.train()

        def step(fwd):
            out = fwd(x)
            (F.cross_entropy(out["cls"], yc) + F.cross_entropy(out["seg"], ys)).backward()
            model.zero_grad(set_to_none=True)

        tb = _time(lambda: step(model), max(1, reps - 1))
        tl = _time(lambda: step(model.forward_per_task), max(1, reps - 1))
        print(f"{label:10s} {'train step':10s} {1e3 * tb:11.1f} {1e3 * tl:9.1f} {tl / tb:13.2f} {'':>11s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ViT-S only, fewer reps")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.time()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, random-init weights (costs do not depend "
          "on them)")
    cost_table(["dinov2_vits14"] if args.quick else ["dinov2_vitb14", "dinov2_vits14"])
    forward_time([("vit_tiny_patch14", "hps", False), ("vit_tiny_patch14", "tesla", False),
                  ("dinov2_vits14", "hps", False), ("dinov2_vits14", "tesla", False),
                  ("dinov2_vits14", "hps", True)], reps=2 if args.quick else 3)
    tesla_ratio(reps=2 if args.quick else 3)
    print(f"\ntotal benchmark time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
