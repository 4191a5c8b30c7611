"""MTL versus single-task baselines on one dataset, one run each, through the same engine.

    python scripts/mtl_vs_single.py [--dataset mtlesd] [--backbone resnet_tiny] [--arch hps] [--epochs 15]

Writes results/tables/mtl_vs_single_<dataset>_<backbone>.{csv,md}. With the defaults the data are SYNTHETIC and the
backbone random-init: the table demonstrates the pipeline, it reproduces nothing of the paper.
"""
from __future__ import annotations

import argparse
import warnings

import pandas as pd

from endoarss_lib.config import preset
from endoarss_lib.engine import fit
from endoarss_lib.metrics import delta_m
from endoarss_lib.results import write_table

warnings.filterwarnings("ignore")
COLUMNS = {"test_cls_accuracy": True, "test_cls_macro_f1": True, "test_seg_miou": True, "test_seg_miou_fg": True,
           "test_seg_dice": True, "test_seg_hd95": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mtlesd")
    parser.add_argument("--backbone", default="resnet_tiny")
    parser.add_argument("--arch", default="hps")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--n-train", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    common = dict(dataset=args.dataset, epochs=args.epochs, image_size=args.image_size, seed=args.seed,
                  synthetic_n_train=args.n_train, synthetic_n_test=48, out_dir="results/runs", progress=False)
    runs = {"multi-task": fit(preset("smoke", model={"backbone": args.backbone, "arch": args.arch}, **common)),
            "cls only": fit(preset("smoke", model={"backbone": args.backbone, "arch": "single", "tasks": ["cls"]},
                                   **common)),
            "seg only": fit(preset("smoke", model={"backbone": args.backbone, "arch": "single", "tasks": ["seg"]},
                                   **common))}
    rows = [{"model": name, **{k: row.get(k, float("nan")) for k in COLUMNS}, "wall_time_s": row["wall_time_s"]}
            for name, row in runs.items()]
    single = {**{k: runs["cls only"][k] for k in COLUMNS if k.startswith("test_cls")},
              **{k: runs["seg only"][k] for k in COLUMNS if k.startswith("test_seg")}}
    gain = delta_m({k: runs["multi-task"][k] for k in COLUMNS}, single, COLUMNS)
    table = pd.DataFrame(rows)
    data = runs["multi-task"]["data"]
    note = (f"{data.upper()} data, random-init {args.backbone}, {args.arch}, {args.epochs} epochs, "
            f"{args.image_size} px, seed {args.seed}, one run each; Delta_m of MTL vs single-task = {gain:+.2%}")
    csv, md = write_table(table, f"results/tables/mtl_vs_single_{args.dataset}_{args.backbone}", note)
    print(md.read_text())


if __name__ == "__main__":
    main()
