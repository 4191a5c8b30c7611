"""Does the project's foundation model make the method show? Frozen pretrained vs frozen random vs trainable ResNet.

On the synthetic ``mtlesd`` default (SYNTHETIC data; the backbone is the project's synthetic-pretrained stand-in for
DINOv2, not DINOv2), over several seeds, this prints mean +- std of test activity accuracy and foreground mIoU for

* frozen pretrained ViT + LoRA + TESLA (the featured model) and + LoRA + HPS;
* the same ViT frozen at random init with LayerScale 1 (a fair random baseline: at timm's 1e-5 every adapter is
  multiplied by 1e-5) and with LayerScale 1e-5;
* a trainable tiny ResNet + HPS;
* TESLA at adapter rank 1 and 16 (do the adapters matter?);
* the segmentation-only model, for the paper's premise on the look-alike pair (needle vs knife: per-class IoU of
  the multi-task model vs the segmentation-only model);

and the linear probes of the weight record (pretrained vs random). Run: ``python benchmarks/bench_foundation.py``
(``--seeds 0 1 2 --epochs 20``; about 15-25 minutes on 2 CPU cores). Writes ``results/tables/bench_foundation.*``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def configs(weights: str, args) -> dict[str, dict]:
    vit = {"backbone": "vit_mini_patch14"}
    pre = {**vit, "pretrained": weights}
    rnd = {**vit, "pretrained": False, "layerscale_init": 1.0}
    out = {
        "pretrained + LoRA + TESLA": {**pre, "arch": "tesla"},
        "pretrained + LoRA + HPS": {**pre, "arch": "hps"},
        "random (LayerScale 1) + LoRA + TESLA": {**rnd, "arch": "tesla"},
        "random (LayerScale 1e-5) + LoRA + TESLA": {**vit, "pretrained": False, "arch": "tesla"},
        "trainable tiny ResNet + HPS": {"backbone": "resnet_tiny", "arch": "hps"},
        "pretrained + TESLA rank 1": {**pre, "arch": "tesla", "lora_rank": 1},
        "pretrained + TESLA rank 16": {**pre, "arch": "tesla", "lora_rank": 16},
        "pretrained seg only": {**pre, "arch": "single", "tasks": ["seg"]},
        "pretrained cls only": {**pre, "arch": "single", "tasks": ["cls"]},
    }
    if args.only:
        out = {k: v for k, v in out.items() if any(o in k for o in args.only)}
    return out


def per_class_iou(run_dir: str, device: str = "cpu") -> list[float]:
    from endoarss_lib.evaluation.inference import evaluate_run
    return evaluate_run(run_dir, split="test", device=device, distances=False)["seg_iou_per_class"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="synthdino_vit_mini14", help="bundled weight name or file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-test", type=int, default=48)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "bench_foundation"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-probe", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from endoarss_lib import fit, preset
    from endoarss_lib.data import get_spec

    spec = get_spec("synthetic_mtlesd")  # class names of the synthetic stand-in (same ids as mtlesd)
    needle, knife = spec.seg_classes.index("injection_needle"), spec.seg_classes.index("electrosurgical_knife")
    rows = []
    for name, model in configs(args.weights, args).items():
        for seed in args.seeds:
            extra = {"lr": args.lr} if args.lr else {}
            cfg = preset("smoke", dataset="mtlesd", model=model, seed=seed, epochs=args.epochs,
                         synthetic_n_train=args.n_train, synthetic_n_test=args.n_test, image_size=args.image_size,
                         out_dir=str(Path(args.out_dir) / "runs"), progress=False, **extra)
            t = time.perf_counter()
            row = fit(cfg)
            iou = per_class_iou(row["run_dir"]) if "seg" in cfg.tasks else [np.nan] * spec.num_seg_classes
            rows.append({"config": name, "seed": seed, "accuracy": row.get("test_cls_accuracy", np.nan),
                         "miou_fg": row.get("test_seg_miou_fg", np.nan), "iou_needle": iou[needle],
                         "iou_knife": iou[knife], "wall_s": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    summary = df.groupby("config", sort=False).agg(
        seeds=("seed", "count"), accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        miou_fg=("miou_fg", "mean"), miou_fg_std=("miou_fg", "std"), iou_needle=("iou_needle", "mean"),
        iou_needle_std=("iou_needle", "std"), iou_knife=("iou_knife", "mean"), iou_knife_std=("iou_knife", "std"))
    note = (f"SYNTHETIC data (mtlesd, {args.n_train} train incl. validation / {args.n_test} test, {args.image_size} "
            f"px, {args.epochs} epochs, seeds {args.seeds}); backbone '{args.weights}' is the project's "
            "synthetic-pretrained stand-in, not DINOv2")
    pd.set_option("display.width", 200)
    print(note)
    print(summary.round(3).to_string())
    if not args.no_probe:
        from endoarss_lib.foundation import evaluate_backbone

        for label, weights, ls in (("pretrained", args.weights, None), ("random LayerScale 1", None, 1.0),
                                   ("random LayerScale 1e-5", None, None)):
            r = evaluate_backbone(weights, layerscale_init=ls)
            print(f"linear probe {label}: activity accuracy {r['linear_probe_accuracy']:.3f} (majority "
                  f"{r['majority_accuracy']:.3f}), patch probe fg mIoU {r['patch_probe_miou_fg']:.3f}")
    from endoarss_lib.experiments.results import write_table

    out = ROOT / "results" / "tables" / "bench_foundation"
    write_table(summary.reset_index().round(4), out, note)
    print("written:", out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
