"""Train every run the notebooks use at a scale (default: demonstration), most important notebooks first.

    python scripts/demonstration_runs.py                 # all, resuming where it stopped (the run store)
    python scripts/demonstration_runs.py --list          # what would train, and how many runs
    python scripts/demonstration_runs.py --only 04_ablation_components 02_main_results

The configurations are exactly those the notebooks make (``endoarss_lib.evidence.variants.NOTEBOOK_VARIANTS`` with
the featured configuration and the scale's sizes, seeds and early stopping), so ``make executed`` afterwards finds
every training finished in the run store (``results/runs``) and only evaluates. A run shared by several notebooks
trains once. Interrupt it at any time: rerunning resumes each unfinished run from its last epoch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def plan(scale: str, only=None) -> list[tuple[str, object]]:
    """``[(notebook key, {RunKey: TrainConfig})]`` in training order, each run listed once."""
    from endoarss_lib.evidence.variants import NOTEBOOK_DATASETS, NOTEBOOK_VARIANTS, featured_model, notebook_variants
    from endoarss_lib.experiments.experiment import Experiment

    seen, out = set(), []
    for key in NOTEBOOK_VARIANTS:
        notebook = key.partition(":")[0]
        if only and notebook not in only and key not in only:
            continue
        exp = Experiment(notebook, scale=scale, dataset=NOTEBOOK_DATASETS.get(key, "mtlesd"), model=featured_model(),
                         out_dir=str(ROOT / "results" / "demonstration_runs"))
        configs = {k: c for k, c in exp.variants(notebook_variants(key), seeds=exp.seeds).items()
                   if (c.dataset, c.results_hash()) not in seen}
        seen.update((c.dataset, c.results_hash()) for c in configs.values())
        out.append((key, exp, configs))
    return out


def ordered(work) -> dict:
    """Every run of the plan in one mapping, ``"<notebook>: <variant> | seed <s>"`` -> config: the featured
    configuration's runs first (every notebook shows them), then notebook by notebook, the notebooks with the fewest
    runs of their own first, so that an interrupted demonstration has its most used runs and as many whole notebooks
    as it can (``--list`` prints the order)."""
    from endoarss_lib.evidence.variants import FEATURED

    def featured(key, k):  # the featured configuration on a notebook's own data (not a role's, e.g. ":longtail")
        return getattr(k, "variant", None) == FEATURED and ":" not in key

    items = [(f"{key}: {k}", not featured(key, k), c, len(configs)) for key, _, configs in work
             for k, c in configs.items()]
    # stable: the plan's order among notebooks of as many runs, and within a notebook
    items.sort(key=lambda item: (item[1], item[3]))
    return {name: c for name, _, c, _ in items}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="demonstration", choices=("demonstration", "test"))
    p.add_argument("--only", nargs="*", help="notebooks (or notebook:role keys) to train for")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs at once (0: one per GPU, else one per CPU core, each on one thread)")
    args = p.parse_args(argv)
    work = plan(args.scale, args.only)
    runs = ordered(work)
    print(f"{len(runs)} runs at the {args.scale} scale", flush=True)
    if args.list:
        for key, _, configs in sorted(work, key=lambda w: len(w[2])):  # the training order (after the featured runs)
            print(f"{key}: {len(configs)} runs: {sorted({k.variant for k in configs})}")
        return 0
    from endoarss_lib.training.console import show_progress
    from endoarss_lib.training.runner import run_grid

    show_progress("info")  # each worker's start / epoch / end lines, with its pid
    started = time.time()
    rows = run_grid(runs, jobs=args.jobs, progress=False)  # one pool for all: no idle worker between notebooks
    print(f"done: {len(rows)} runs in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
