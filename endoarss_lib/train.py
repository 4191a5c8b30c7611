"""Command line: ``python -m endoarss_lib.train --config run.yaml [key=value ...]`` (or ``--preset smoke``).

Overrides are YAML values: ``epochs=5 weighting=db_mtl model.arch=hps model.pretrained=/weights/dinov2.pth``.
Under ``torchrun --nproc_per_node N`` the run is data-parallel. Rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import apply_overrides, load_config, preset
from .engine import fit


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m endoarss_lib.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML file of TrainConfig fields (preset: smoke|paper|released first)")
    source.add_argument("--preset", default="smoke", help="start from a preset instead of a file")
    parser.add_argument("overrides", nargs="*", help="key=value (model.<option>=value for model options)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides) if args.config else apply_overrides(preset(args.preset),
                                                                                            args.overrides)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    row = fit(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(row, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
