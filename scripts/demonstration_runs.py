"""Train every run the notebooks use at a scale (default: demonstration): the featured runs first, then whole notebooks.

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


def plan(scale: str, only=None) -> list[tuple[str, dict]]:
    """``[(notebook, {"<key>: <variant> | seed <s>": TrainConfig})]``: every run each notebook needs (its roles'
    too, e.g. ``10_seed_components:longtail``), runs shared by notebooks listed under each of them."""
    from endoarss_lib.evidence.variants import NOTEBOOK_DATASETS, NOTEBOOK_VARIANTS, featured_model, notebook_variants
    from endoarss_lib.experiments.experiment import Experiment

    out: dict[str, dict] = {}
    for key in NOTEBOOK_VARIANTS:
        notebook = key.partition(":")[0]
        if only and notebook not in only and key not in only:
            continue
        exp = Experiment(notebook, scale=scale, dataset=NOTEBOOK_DATASETS.get(key, "mtlesd"), model=featured_model(),
                         out_dir=str(ROOT / "results" / "demonstration_runs"), progress=None)
        configs = exp.variants(notebook_variants(key), seeds=exp.seeds)
        out.setdefault(notebook, {}).update({f"{key}: {k}": c for k, c in configs.items()})
    return list(out.items())


def ordered(work) -> tuple[dict, list[tuple[str, list[str]]]]:
    """Every run once, in training order, and ``[(notebook, its runs not trained before it)]``: the featured
    configuration on MTLESD first (every notebook shows it), then whole notebooks, each time the one with the fewest
    runs still to train (ties: the plan's order), so that an interrupted demonstration has its most used runs and as
    many finished notebooks as it can (``--list`` prints the order)."""
    from endoarss_lib.evidence.variants import FEATURED

    def run_id(c):
        return c.dataset, c.results_hash()

    runs: dict = {}
    steps: list[tuple[str, list[str]]] = []

    def take(names, configs):  # the runs of ``names`` not taken yet (each run once, under its first name)
        seen, new = {run_id(c) for c in runs.values()}, []
        for n in names:
            if run_id(configs[n]) not in seen:
                seen.add(run_id(configs[n]))
                runs[n] = configs[n]
                new.append(n)
        return new

    featured = [(nb, n) for nb, configs in work for n, c in configs.items()
                if ":" not in n.partition(": ")[0] and n.partition(": ")[2].startswith(f"{FEATURED} |")
                and c.dataset == "mtlesd"]
    if featured:
        steps.append((f"{FEATURED} (featured, mtlesd)", take([n for _, n in featured],
                                                           {n: dict(work)[nb][n] for nb, n in featured})))
    left = dict(work)
    while left:
        seen = {run_id(c) for c in runs.values()}
        cost = {nb: sum(run_id(c) not in seen for c in configs.values()) for nb, configs in left.items()}
        nb = min(left, key=lambda k: cost[k])  # min keeps the first of equal costs: the plan's order
        steps.append((nb, take(list(left[nb]), left[nb])))
        del left[nb]
    return runs, steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="demonstration", choices=("demonstration", "test"))
    p.add_argument("--only", nargs="*", help="notebooks (or notebook:role keys) to train for")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs at once (0: one per GPU, else one per CPU core, each on one thread)")
    args = p.parse_args(argv)
    work = plan(args.scale, args.only)
    runs, steps = ordered(work)
    print(f"{len(runs)} runs at the {args.scale} scale", flush=True)
    if args.list:  # the training order: after each line's runs, that notebook has all of its runs
        for what, names in steps:
            variants = sorted({n.partition(": ")[2].rpartition(" | ")[0] for n in names})
            print(f"{what}: {len(names)} new runs: {variants}")
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
