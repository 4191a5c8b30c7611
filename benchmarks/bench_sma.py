"""SMA on CPU: the reference modules (``impl="reference"``) versus the fused implementation (``impl="fused"``).

    python benchmarks/bench_sma.py [--dim 512] [--size 224] [--batch 1 2] [--repeats 2] [--threads 1] [--no-memory]

Same weights for both (one state dict). Three measurements per batch size:

* **time**: median wall-clock seconds of a forward (eval, ``no_grad``) and of a forward + backward (train, a random
  projection of the output as the loss, gradients of every parameter), the two implementations interleaved round by
  round in one process (the machine's load drifts alike for both);
* **peak memory**: growth of the resident set size during ONE call, in a fresh subprocess per measurement: after
  building the module and one identical warm-up call (lazy initialisations), the high-water mark is reset
  (``/proc/self/clear_refs``), and the peak (``VmHWM``) after the call minus the resident size before it is
  reported. The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns every freed buffer of
  64 KiB or more to the system at once: the number is then the peak of the memory the call's tensors and
  temporaries occupy at the same time (Linux only);
* **saved for backward**: bytes of the distinct tensors autograd keeps between forward and backward (through
  ``torch.autograd.graph.saved_tensors_hooks``; parameters and the input included, storages counted once).

Takes about 2-3 minutes at the defaults on one core (the reference implementation dominates).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLS = ("reference", "fused")


def _module(impl: str, dim: int, seed: int = 0):
    from endoarss_lib.models.sma import SMA

    torch.manual_seed(seed)
    sma = SMA(dim=dim, impl=impl)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial weights everywhere (GroupNorm starts at 1 / 0)
        for p in sma.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sma


def _call(sma, x: torch.Tensor, mode: str, target: torch.Tensor | None = None) -> None:
    if mode == "fwd":
        sma.eval()
        with torch.no_grad():
            sma(x)
    else:
        sma.train()
        sma.zero_grad(set_to_none=True)
        y = sma(x)
        (y * (target if target is not None else 1.0)).sum().backward()


def time_table(args) -> dict:
    """Median seconds per (batch, impl, mode), interleaved rounds."""
    mods = {impl: _module(impl, args.dim) for impl in IMPLS}
    mods["fused"].load_state_dict(mods["reference"].state_dict())
    results = {}
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        for mode in ("fwd", "fwd+bwd"):
            times = {impl: [] for impl in IMPLS}
            for rep in range(args.repeats + 1):
                for impl in IMPLS:
                    start = time.perf_counter()
                    _call(mods[impl], x, mode, target)
                    if rep:  # the first round warms up
                        times[impl].append(time.perf_counter() - start)
            results[(batch, mode)] = {impl: statistics.median(v) for impl, v in times.items()}
    return results


def _status_mib(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def measure_memory(impl: str, dim: int, size: int, batch: int, mode: str) -> dict:
    """In this (fresh) process: peak RSS growth of one call, and the bytes saved for backward."""
    sma = _module(impl, dim)
    x = torch.randn(batch, 3, size, size)
    target = torch.randn(x.shape)
    _call(sma, x, mode, target)  # warm-up: kernels, thread pools, lazy buffers
    sma.zero_grad(set_to_none=True)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size
    before = _status_mib("VmRSS")
    if mode == "fwd":
        _call(sma, x, mode)
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sma.train()
            y = sma(x)
        (y * target).sum().backward()
    return {"peak_growth_mib": _status_mib("VmHWM") - before, "saved_mib": sum(saved.values()) / 2**20}


def memory_table(args) -> dict:
    import endoarss_lib

    results = {}
    root = Path(endoarss_lib.__file__).resolve().parents[1]  # the same package as this process imports
    here = Path(__file__).resolve().parent
    for batch in args.batch:
        for mode in ("fwd", "fwd+bwd"):
            for impl in IMPLS:
                code = (f"import sys, json; sys.path[:0] = [{str(here)!r}, {str(root)!r}];"
                        f"import torch; torch.set_num_threads({args.threads}); import bench_sma;"
                        f"print(json.dumps(bench_sma.measure_memory({impl!r}, {args.dim}, {args.size}, {batch}, "
                        f"{mode!r})))")
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
                results[(batch, mode, impl)] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"SMA d={args.dim}, {args.size} px, patch 7, groups 1, CPU threads {args.threads}, "
          f"median of {args.repeats} interleaved calls")
    times = time_table(args)
    print(f"\n{'batch':>5s} {'pass':8s} {'reference s':>12s} {'fused s':>9s} {'speed-up':>9s}")
    for (batch, mode), t in times.items():
        print(f"{batch:5d} {mode:8s} {t['reference']:12.3f} {t['fused']:9.3f} {t['reference'] / t['fused']:8.1f}x")
    if args.no_memory:
        return
    mem = memory_table(args)
    print(f"\n{'batch':>5s} {'pass':8s} {'peak RSS growth MiB: ref':>25s} {'fused':>7s} {'ratio':>7s}"
          f" {'saved for bwd MiB: ref':>23s} {'fused':>7s}")
    for batch in args.batch:
        for mode in ("fwd", "fwd+bwd"):
            r, f = mem[(batch, mode, "reference")], mem[(batch, mode, "fused")]
            saved = (f" {r['saved_mib']:23.1f} {f['saved_mib']:7.1f}" if mode != "fwd" else "")
            print(f"{batch:5d} {mode:8s} {r['peak_growth_mib']:25.1f} {f['peak_growth_mib']:7.1f} "
                  f"{r['peak_growth_mib'] / max(f['peak_growth_mib'], 1e-9):6.1f}x" + saved)


if __name__ == "__main__":
    main()
