"""Command line: ``python -m endoarss_lib.foundation [--out DIR] [--<recipe option> VALUE ...]`` (installed as
``endoarss-pretrain``; ``--help`` lists the recipe's options). Exit status 0, 1 (a file cannot be written or read)
or 2 (a bad option)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..cli import add_standard_options, prog, run_command
from ..coerce import coerce
from ..training.console import showing_progress
from .loop import pretrain
from .recipe import PretrainConfig

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("endoarss_lib.foundation", "endoarss-pretrain"),
        description="Pretrain the project's small DINOv2-architecture ViT with DINO + iBOT + KoLeo on unlabelled "
                    "synthetic endoscopic images; writes <out>/<name>.safetensors and <name>.json (the weight "
                    "record). Defaults reproduce the bundled weights (about 50 minutes on 2 CPU cores).")
    p.add_argument("--out", default="pretrain_out", help="output folder (default: pretrain_out)")
    p.add_argument("--no-eval", action="store_true", help="skip the linear probes at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars; log warnings and errors only")
    add_standard_options(p)
    for f in fields(PretrainConfig):
        default = f.default
        if isinstance(default, tuple):
            p.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", type=type(default[0]), default=default,
                           help=f"(default: {' '.join(map(str, default))})")
        elif isinstance(default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda v, n=f.name: coerce(n, v, bool),
                           default=default, help=f"true or false (default: {default})")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                           help=f"(default: {default})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0, 1 (a file cannot be written or read) or 2 (a bad option); ``--debug`` shows
    tracebacks."""
    args = _parser().parse_args(argv)
    with showing_progress("quiet" if args.quiet else "info"):  # the package's log lines on stderr
        return run_command(lambda: _run(args), debug=args.debug, usage=(ValueError,))


def _run(args) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)}
    cfg = PretrainConfig(**values)
    record = pretrain(cfg, Path(args.out).expanduser(), progress=not args.quiet, evaluate=not args.no_eval)
    print(json.dumps({k: record[k] for k in ("name", "file", "sha256", "training")}, indent=2))
    if "metrics" in record:
        print(json.dumps(record["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
