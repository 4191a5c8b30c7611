"""Command line: ``python -m endoarss_lib.train --config run.yaml [key=value ...]`` (or ``--preset smoke``).

Overrides are typed by their field: ``epochs=5 weighting=db_mtl augment=off model.arch=hps
model.pretrained=/weights/dinov2.pth``. ``--print-config`` prints the resolved config as YAML and exits. Under
``torchrun --nproc_per_node N`` the run is data-parallel. Rerunning the same command resumes. Also installed as
``endoarss-train``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from .config import PRESETS, ConfigError, config_help, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m endoarss_lib.train", description=__doc__,
                                     epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML file of config fields (first key: preset: smoke|paper|released)")
    source.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="start from a preset (default: "
                                                                                  "smoke)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="key=value (model.<option>=value for model options)")
    return parser


def resolve(argv=None):
    """The TrainConfig the command line describes (ConfigError with a clear message otherwise)."""
    args = _parser().parse_args(argv)
    return load_config(args.config, args.overrides, preset_name=args.preset), args


def main(argv=None) -> int:
    """Entry point; returns the exit status: 0, 1 (the run failed on its data, weights or run folder; the message
    names the file) or 2 (a bad config)."""
    try:
        cfg, args = resolve(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .data import DataError
    from .engine import CheckpointMismatch, RunError, fit
    from .models.weights import WeightsError

    try:
        row = fit(cfg)
    except ConfigError as exc:  # e.g. synthetic=false without data_root
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataError, RunError, CheckpointMismatch, WeightsError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # these name their file and say what to do: no traceback needed
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(row, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
