"""benchmarks/bench_training.py at a tiny size: its three sections, the featured model as the ratios' base, and the
GFLOPs it prints equal count_gflops of the same model (an independent count: FlopCounterMode on a forward)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_training_prints_flops_step_times_and_profile():
    bench = _bench()
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            bench.main(["--image-size", "56", "--batch", "2", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    text = out.getvalue()
    assert "== 1." in text and "== 2." in text and "== 3." in text
    assert re.search(r"^featured\s+[\d.]+ s/step .* speed x 1\.00 vs featured", text, re.M)
    assert re.search(r"^no SMA\s+[\d.]+ s/step", text, re.M)
    # section 1's featured total is the FLOP count of the featured model (FlopCounterMode, forward, 1 MAC = 2 FLOPs)
    from endoarss_lib.models import count_gflops

    total = float(re.search(r"^featured\s+total\s+([\d.]+)", text, re.M).group(1))
    assert abs(total - count_gflops(bench._model(56), 56)) < 0.006
    share = float(re.search(r"convolutions \(mm / matmul / linear / conv\): ([\d.]+) %", text).group(1))
    assert 0 < share <= 100
