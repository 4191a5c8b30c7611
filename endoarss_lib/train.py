"""Command line: ``python -m endoarss_lib.train --config run.yaml [key=value ...]`` (or ``--preset smoke``).

Overrides are typed by their field: ``epochs=5 weighting=db_mtl augment=off model.arch=hps
model.pretrained=/weights/dinov2.pth``; text fields keep what was typed (``run_name=007``), one entry of a mapping is
``loss_weights.cls=2``, names are matched ignoring case (``weighting=DB-MTL`` is ``db_mtl``). ``--print-config``
prints the resolved config as YAML and exits. A frozen DINOv2 backbone without weights (``--preset paper`` /
``released`` as they are) does not start: the error says which checkpoint to get and where;
``model.pretrained=random`` trains on a random backbone on purpose. The run's log lines (start, one per epoch, end) go
to stderr, the result row to stdout; ``--quiet`` keeps warnings only, ``--verbose`` adds debug lines. Under ``torchrun
--nproc_per_node N`` the run is data-parallel. Rerunning the same command resumes. Errors are one message naming the
field or file (exit status 2: a bad command line or config; 1: data, weights, run folder or disk); ``--debug`` shows
the traceback. Also installed as
``endoarss-train``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from .atomic import LockHeld
from .cli import add_standard_options, add_verbosity_options, prog, run_command, verbosity
from .config import PRESETS, ConfigError, config_help, load_config, require_backbone_weights
from .data import DataError
from .models.weights import WeightsError
from .training import engine
from .training.console import showing_progress
from .training.engine import CheckpointMismatch, RunError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("endoarss_lib.train", "endoarss-train"), description=__doc__,
                                     epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML file of config fields (first key: preset: smoke|paper|released)")
    source.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="start from a preset (default: "
                                                                                  "smoke)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_standard_options(parser)
    add_verbosity_options(parser)
    parser.add_argument("overrides", nargs="*", help="key=value (model.<option>=value for model options, "
                                                     "<field>.<key>=value for one entry of a mapping field)")
    return parser


def resolve(argv=None):
    """The TrainConfig the command line describes (ConfigError with a clear message otherwise)."""
    args = _parser().parse_args(argv)
    return load_config(args.config, args.overrides, preset_name=args.preset), args


def main(argv=None) -> int:
    """Entry point; returns the exit status: 0, 1 (the run failed on its data, weights, run folder or disk, or
    diverged; the message names the file) or 2 (a bad command line or config). ``--debug`` shows tracebacks."""
    args = _parser().parse_args(argv)
    with showing_progress(verbosity(args)):  # the run's log lines on stderr (the result row goes to stdout)
        return run_command(lambda: _run(args), debug=args.debug, failures=_failures(), usage=(ConfigError,))


def _failures() -> tuple:
    return (DataError, RunError, CheckpointMismatch, WeightsError, LockHeld, OSError)


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides, preset_name=args.preset)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    require_backbone_weights(cfg)  # a frozen DINOv2 without weights (the paper preset's default) does not start
    row = engine.fit(cfg)  # looked up at call time (tests replace engine.fit)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(row, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
