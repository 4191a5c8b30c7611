"""GPU speed of the paper configuration beside the paper's numbers: inference and training images/s and peak memory.

    python benchmarks/bench_gpu.py                    # CUDA: DINOv2 ViT-B/14 + SMA (d 512) + TESLA, 224 px
    python benchmarks/bench_gpu.py --tiny             # CPU smoke run: vit_tiny_patch14, 56 px, batch 2
    python benchmarks/bench_gpu.py --device cuda      # on a machine without CUDA: says "no CUDA device", exit 2

Without CUDA the default (``--device auto``) says "no CUDA device" and measures the ``--tiny`` configuration on the
CPU (so ``make bench`` stays short there).

The model is ``endoarss_lib.experiments.bench.cost_model("dinov2_vitb14", "tesla", sma=True, sma_dim=512, image_size=224)``
(random init: speed and memory do not depend on the weights). Six measurements, each with
:func:`endoarss_lib.experiments.bench.measure_inference` / :func:`~endoarss_lib.experiments.bench.measure_training` (random inputs already on
the device; the data pipeline is ``bench_data.py``'s business):

* inference (eval, no grad) at ``--inference-batch`` (default 1: the paper does not state its batch; 35.66 img/s on
  an RTX 4090 is a per-image figure) in fp32, under bf16 autocast, and bf16 + ``torch.compile``;
* training steps (forward, task losses, the weighting's backward, Adam) at batch ``--train-batch`` (16, the paper's)
  with ``--weighting`` (DB-MTL, the paper's MTLESD headline method) in the same three precisions.

Peak memory is ``torch.cuda.max_memory_allocated`` (live tensors, weights included; the paper's 9,858 / 1,668 MiB
are most likely nvidia-smi figures, which add the CUDA context and the allocator cache; ``peak_reserved_mib`` in the
CSV adds the cache). Attention: timm's ViT blocks call ``F.scaled_dot_product_attention`` (PyTorch's SDPA: flash /
memory-efficient kernels on CUDA) when ``timm.layers.use_fused_attn()`` is true; the table's note says whether every
attention block of the model does. ``torch.compile`` runs in a child process with a time limit
(``--compile-timeout``): a compilation that fails or takes too long is reported as skipped, with the reason. Results
go to ``results/tables/bench_gpu.md`` / ``.csv`` (``--tiny``: ``bench_gpu_tiny``; ``--out`` to choose).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from endoarss_lib.experiments.bench import PAPER_EFFICIENCY, cost_model, measure_inference, measure_training

REPO = Path(__file__).resolve().parents[1]
PAPER = dict(backbone="dinov2_vitb14", image_size=224, train_batch=16, inference_batch=1)
TINY = dict(backbone="vit_tiny_patch14", image_size=56, train_batch=2, inference_batch=2)
PRECISIONS = ("fp32", "bf16", "bf16+compile")
MODES = ("inference", "training")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="vit_tiny_patch14, 56 px, batch 2: a CPU smoke run")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 16; --tiny: 2)")
    parser.add_argument("--inference-batch", type=int, default=None, help="inference batch (default 1; --tiny: 2)")
    parser.add_argument("--weighting", default="db_mtl", help="weighting of the training steps (default db_mtl)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; --tiny: 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--compile-timeout", type=float, default=900.0,
                        help="seconds for the compiled measurements (compilation included; default 900)")
    parser.add_argument("--out", default=None, help="table path without suffix (default results/tables/bench_gpu, "
                                                    "--tiny: results/tables/bench_gpu_tiny)")
    parser.add_argument("--only-compiled", action="store_true", help=argparse.SUPPRESS)  # the child process
    return parser


def _settings(args) -> dict:
    base = TINY if args.tiny else PAPER
    return {"backbone": base["backbone"], "image_size": base["image_size"],
            "train_batch": args.train_batch or base["train_batch"],
            "inference_batch": args.inference_batch or base["inference_batch"],
            "steps": args.steps or (2 if args.tiny else 20), "warmup": args.warmup or (1 if args.tiny else 5),
            "weighting": args.weighting}


def _device(name: str) -> torch.device:
    """The device asked for; SystemExit(2) with "no CUDA device" when CUDA is asked for and missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: --device {name} asked for CUDA, but torch {torch.__version__} sees no CUDA device on "
              f"this machine (torch.cuda.is_available() is False). Nothing was measured; run it on a GPU machine, or "
              f"use --device cpu (with --tiny for a smoke run)", file=sys.stderr)
        raise SystemExit(2)
    return device


def _model(settings: dict):
    return cost_model(settings["backbone"], "tesla", sma=True, sma_dim=512, image_size=settings["image_size"])


def sdpa_report(model) -> str:
    """Whether the model's attention blocks use PyTorch's scaled_dot_product_attention (timm's fused_attn)."""
    import timm

    flags = [bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    fused = timm.layers.use_fused_attn()
    if not flags:
        return f"no timm attention block found (timm.layers.use_fused_attn() = {fused})"
    used = sum(flags)
    return (f"{used}/{len(flags)} attention blocks use F.scaled_dot_product_attention "
            f"(timm.layers.use_fused_attn() = {fused})")


def _measure(mode: str, precision: str, model, settings: dict, device: torch.device) -> dict:
    amp = "off" if precision == "fp32" else "bf16"
    if precision.endswith("compile"):
        model = torch.compile(model)
    common = dict(image_size=settings["image_size"], device=device, steps=settings["steps"],
                  warmup=settings["warmup"], amp=amp)
    if mode == "inference":
        row = measure_inference(model, batch_size=settings["inference_batch"], **common)
    else:
        row = measure_training(model, batch_size=settings["train_batch"], weighting=settings["weighting"], **common)
    return {"mode": mode, "precision": precision, **{k: row[k] for k in (
        "batch_size", "images_per_s", "ms_per_batch", "peak_memory_mib", "peak_reserved_mib", "memory_kind",
        "device_name") if k in row}, "status": "ok"}


def _compiled_rows(args, argv: list[str]) -> list[dict]:
    """The torch.compile rows, measured in a child process under a time limit (skipped rows say why)."""
    skipped = [{"mode": m, "precision": "bf16+compile", "status": ""} for m in MODES]
    if args.no_compile:
        return [{**r, "status": "skipped (--no-compile)"} for r in skipped]
    argv = [a for a in argv if a != "--only-compiled"] + ["--only-compiled"]
    import endoarss_lib

    library = str(Path(endoarss_lib.__file__).resolve().parents[1])  # the child uses this process's library
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [library, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    # its own process group, so that a timeout also ends the compiler's worker processes
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return [{**r, "status": f"skipped: compilation and measurement took over {args.compile_timeout:.0f} s"}
                for r in skipped]
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    if child.returncode != 0 or not lines:
        reason = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        return [{**r, "status": f"skipped: torch.compile failed ({reason})"} for r in skipped]
    rows = json.loads(lines[-1])
    print(f"(compiled rows measured in a child process in {time.perf_counter() - start:.0f} s, compilation included)")
    return rows


def _table(rows: list[dict]):
    import pandas as pd

    paper = PAPER_EFFICIENCY
    frame = pd.DataFrame(rows)
    frame["paper images/s"] = [paper["images_per_s"] if m == "inference" else None for m in frame["mode"]]
    frame["paper memory (MiB)"] = [paper["inference_memory_mib"] if m == "inference" else paper["train_memory_mib"]
                                   for m in frame["mode"]]
    columns = ["mode", "precision", "batch_size", "images_per_s", "paper images/s", "peak_memory_mib",
               "paper memory (MiB)", "ms_per_batch", "peak_reserved_mib", "memory_kind", "status"]
    return frame.reindex(columns=columns)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    device = _device(args.device)
    if args.device == "auto" and device.type == "cpu" and not args.tiny:  # e.g. `make bench` on a CPU machine
        print("no CUDA device: the paper configuration is a GPU measurement; measuring the --tiny configuration on "
              "the CPU instead (--device cpu measures the paper configuration on the CPU, slowly)")
        args.tiny = True
        argv.append("--tiny")
    settings = _settings(args)
    precisions = ("bf16+compile",) if args.only_compiled else ("fp32", "bf16")
    model = _model(settings)
    rows = [_measure(mode, p, model, settings, device) for p in precisions for mode in MODES]
    if args.only_compiled:
        print(json.dumps(rows))
        return 0
    rows += _compiled_rows(args, argv)
    order = {(m, p): i for i, (p, m) in enumerate((p, m) for p in PRECISIONS for m in MODES)}
    table = _table(sorted(rows, key=lambda r: order[(r["mode"], r["precision"])]))
    device_name = next((r["device_name"] for r in rows if r.get("device_name")), str(device))
    note = (f"{settings['backbone']} + SMA (d 512) + TESLA, {settings['image_size']} px, {device_name} ({device}), "
            f"torch {torch.__version__}; training: {settings['weighting']} + Adam; {sdpa_report(model)}; paper: "
            f"{PAPER_EFFICIENCY['gpu']}, 224 px (memory most likely nvidia-smi's; ours: "
            f"{rows[0]['memory_kind']})" + ("; TINY smoke run, not the paper configuration" if args.tiny else ""))
    from endoarss_lib.experiments.results import write_table

    out = Path(args.out) if args.out else REPO / "results" / "tables" / ("bench_gpu_tiny" if args.tiny else
                                                                          "bench_gpu")
    paths = write_table(table, out, note)
    print(note)
    print(table.to_string(index=False))
    print("written:", ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
