"""benchmarks/bench_gpu.py: a CPU smoke run at the tiny size writes the table, and CUDA asked for on a machine
without it is refused clearly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import endoarss_lib
from endoarss_lib.experiments.bench import PAPER_EFFICIENCY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
COLUMNS = ["mode", "precision", "batch_size", "images_per_s", "paper images/s", "peak_memory_mib",
           "paper memory (MiB)", "ms_per_batch", "peak_reserved_mib", "memory_kind", "status"]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    library = str(Path(endoarss_lib.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": library, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_tiny_cpu_run_writes_the_table_beside_the_paper(tmp_path):
    done = _run("--tiny", "--device", "cpu", "--no-compile", "--out", str(tmp_path / "bench"))
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "bench.csv")
    assert list(table.columns) == COLUMNS
    assert list(zip(table["mode"], table["precision"])) == [
        ("inference", "fp32"), ("training", "fp32"), ("inference", "bf16"), ("training", "bf16"),
        ("inference", "bf16+compile"), ("training", "bf16+compile")]
    measured = table[table["status"] == "ok"]
    assert len(measured) == 4 and (measured["images_per_s"] > 0).all() and (measured["batch_size"] == 2).all()
    assert table[table["precision"] == "bf16+compile"]["status"].str.startswith("skipped").all()
    inference = table[table["mode"] == "inference"]
    assert (inference["paper images/s"] == PAPER_EFFICIENCY["images_per_s"]).all()
    assert (inference["paper memory (MiB)"] == PAPER_EFFICIENCY["inference_memory_mib"]).all()
    assert (table[table["mode"] == "training"]["paper memory (MiB)"] == PAPER_EFFICIENCY["train_memory_mib"]).all()
    note = (tmp_path / "bench.md").read_text().splitlines()[0]
    assert "vit_tiny_patch14" in note and "TINY" in note and "scaled_dot_product_attention" in note


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_says_so(tmp_path):
    done = _run("--device", "cuda", "--out", str(tmp_path / "bench"), timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not list(tmp_path.iterdir())
