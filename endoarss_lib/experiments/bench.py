"""Throughput and peak memory of a model: inference (eval, no grad) and training steps (forward + backward + Adam).

Inputs are random tensors created on the device before timing: the numbers cover the model only (no data loading,
decoding or augmentation). Time is wall-clock over ``steps`` batches after ``warmup`` batches, with CUDA synchronised
before the clock starts and stops. What "peak memory" means depends on the device (:data:`MEMORY_DEFINITIONS`):

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the most memory PyTorch's caching
  allocator held in live tensors during warm-up and timed steps (weights, activations, gradients, optimiser state).
  It excludes the CUDA context (a few hundred MiB) and cached-but-free blocks, which ``nvidia-smi`` shows;
  ``peak_reserved_mib`` (``max_memory_reserved``) adds the cache.
* **CPU**: the process's peak resident set size during the measurement minus its RSS at the start (Linux
  ``/proc/self/status`` VmHWM and VmRSS). First, freed heap memory is handed back to the OS (glibc
  ``malloc_trim``; otherwise tensors reusing it would not raise the RSS) and the peak is reset to the current RSS
  (``/proc/self/clear_refs``; this also resets ``ru_maxrss`` for the rest of the process). Where the reset is
  impossible the row says ``peak_reset=False`` and an older, higher peak may be counted. RSS also counts allocator
  overhead and library pages loaded on first use, so the number is, up to page granularity, an **upper bound** on
  what the measurement's tensors needed. Weights already in memory are not included; ``weights_mib`` gives their
  size.
"""
from __future__ import annotations

import ctypes
import gc
import math
import platform
import resource
import time
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..models import RandomInitWarning, build_model, count_gflops
from ..robustness.corruptions import CORRUPTIONS, GROUP_OF, check_names, check_severities, corrupt
from ..tasks import get_task
from ..training.engine import autocast, resolve_device, train_step
from ..weighting import get_weighting

__all__ = ["measure_inference", "measure_training", "achieved_tflops", "paper_comparison", "MEMORY_DEFINITIONS",
           "MEMORY_KINDS", "PAPER_EFFICIENCY", "cost_model", "gflops_table", "benchmark_corruptions"]


MEMORY_DEFINITIONS = {
    "cuda": "CUDA max allocated (torch.cuda.max_memory_allocated over warm-up + timed steps): live tensors incl. "
            "weights; excludes the CUDA context and allocator cache that nvidia-smi counts",
    "cpu": "CPU increase of the process's peak RSS over its RSS at the start (heap trimmed, peak reset first): "
           "an upper bound on the extra memory the measurement needed; excludes weights already loaded",
}

MEMORY_KINDS = {"cuda": "CUDA max allocated (weights incl.; no context, no cache)",
                "cpu": "CPU peak RSS increase, upper bound (weights excl.)"}

# Paper Sec. IV-D (Discussion): one NVIDIA RTX 4090, 224 px, DINOv2 ViT-B/14 + SMA + TESLA. Batch sizes of the
# measurements are not stated (training uses batch 16 per Sec. IV-B); memory is most likely nvidia-smi's figure.
PAPER_EFFICIENCY = {"train_memory_mib": 9858.0, "inference_memory_mib": 1668.0, "images_per_s": 35.66,
                    "gpu": "NVIDIA RTX 4090", "image_size": 224, "train_batch_size": 16}


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: expected an int >= {low}")
    return value


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp={amp!r}: expected 'auto' (bf16 on CUDA, off on CPU), 'bf16' or 'off'")
    return "bf16" if amp == "bf16" or (amp == "auto" and device.type == "cuda") else "off"


def _autocast(device: torch.device, amp: str):
    return autocast(device, amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _rss_now_mib() -> float:
    value = _proc_status_mib("VmRSS")
    return value if value is not None else _rss_peak_mib()


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that reusing it shows up in RSS again."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _rss_peak_mib() -> float:
    value = _proc_status_mib("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _MemoryProbe:
    """Peak memory of a block of work, with the device's definition (see :data:`MEMORY_DEFINITIONS`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            self.peak_reset = _reset_rss_peak()
            self.rss_before = _rss_now_mib()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        if self.device.type == "cuda":
            self.result = {"peak_memory_mib": torch.cuda.max_memory_allocated(self.device) / 2 ** 20,
                           "peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2 ** 20}
        else:
            peak = _rss_peak_mib()
            self.result = {"peak_memory_mib": max(peak - self.rss_before, 0.0), "rss_before_mib": self.rss_before,
                           "peak_rss_mib": peak, "peak_reset": self.peak_reset}
        self.result["memory_kind"] = MEMORY_KINDS[self.device.type]
        self.result["memory_definition"] = MEMORY_DEFINITIONS[self.device.type]
        return False


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _weights_mib(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def _row(mode, model, device, amp, image_size, batch_size, steps, warmup, elapsed, memory) -> dict:
    report = model.parameter_report()["total"] if hasattr(model, "parameter_report") else {}
    return {"mode": mode, "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "amp": amp, "image_size": image_size, "batch_size": batch_size,
            "steps": steps, "warmup": warmup, "elapsed_s": elapsed, "images_per_s": batch_size * steps / elapsed,
            "ms_per_batch": 1e3 * elapsed / steps, "params_total": report.get("total"),
            "params_trainable": report.get("trainable"), "weights_mib": _weights_mib(model), **memory}


def _validate(image_size, batch_size, steps, warmup) -> None:
    _check_int("image_size", image_size, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("steps", steps, 1)
    _check_int("warmup", warmup, 0)


def measure_inference(model: torch.nn.Module, image_size: int, batch_size: int = 8, device="cpu", steps: int = 10,
                      warmup: int = 2, amp: str = "auto") -> dict:
    """Images/s, ms per batch and peak memory of ``model(x)`` in eval mode under ``torch.no_grad`` (model moved)."""
    _validate(image_size, batch_size, steps, warmup)
    device = resolve_device(str(device))
    amp = _resolve_amp(amp, device)
    was_training = model.training
    model.to(device).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    try:
        with _MemoryProbe(device) as probe, torch.no_grad(), _autocast(device, amp):
            for _ in range(warmup):
                model(x)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                model(x)
            _sync(device)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return _row("inference", model, device, amp, image_size, batch_size, steps, warmup, elapsed, probe.result)


def _random_batch(model, image_size: int, batch_size: int, device: torch.device) -> dict:
    config, batch = model.config, {}
    batch["image"] = torch.randn(batch_size, 3, image_size, image_size, device=device)
    for t in model.tasks:  # each task's random target (the activity's labels, the masks, ...)
        task = get_task(t)
        batch[task.target] = task.example_target(config.classes_of(t), batch_size, image_size, device)
    return batch


def _train_step(model, batch, optimizer, weighting, device, amp) -> None:
    """One engine training step (:func:`endoarss_lib.training.engine.train_step`) and the optimiser step."""
    train_step(model, batch, weighting, model.tasks, device=device, amp=amp)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training(model: torch.nn.Module, image_size: int, batch_size: int = 8, device="cpu", steps: int = 5,
                     warmup: int = 1, amp: str = "auto", weighting: str = "ew", lr: float = 1e-4) -> dict:
    """Images/s and peak memory of training steps (forward, task losses, ``weighting.backward``, Adam) on random
    inputs, as :func:`endoarss_lib.training.engine.fit` does them; updates ``model``'s trainable parameters (and
    BatchNorm statistics) in place."""
    _validate(image_size, batch_size, steps, warmup)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r}: expected a finite number > 0")
    device = resolve_device(str(device))
    amp = _resolve_amp(amp, device)
    method = get_weighting(weighting)
    method.set_epoch(0, 1)
    was_training = model.training
    model.to(device).train()
    batch = _random_batch(model, image_size, batch_size, device)
    try:
        with _MemoryProbe(device) as probe:
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            for _ in range(warmup):
                _train_step(model, batch, optimizer, method, device, amp)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                _train_step(model, batch, optimizer, method, device, amp)
            _sync(device)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    row = _row("training", model, device, amp, image_size, batch_size, steps, warmup, elapsed, probe.result)
    return {**row, "weighting": method.name, "optimizer": "Adam"}


def achieved_tflops(images_per_s: float, gflops_per_image: float) -> float:
    """Sustained TFLOP/s implied by a throughput and a per-image forward cost: ``images/s x GFLOPs / 1000``."""
    return images_per_s * gflops_per_image / 1e3


def _setting(row: dict) -> str:
    return (f"{row['device_name']} ({row['device']}), {row['image_size']} px, batch {row['batch_size']}, "
            f"amp {row['amp']}")


def paper_comparison(training: dict, inference: dict):
    """A table of our training / inference peak memory and images/s beside the paper's RTX 4090 numbers."""
    paper, setting = PAPER_EFFICIENCY, _setting
    rows = [("training peak memory (MiB)", paper["train_memory_mib"], training["peak_memory_mib"], setting(training),
             training["memory_kind"]),
            ("inference peak memory (MiB)", paper["inference_memory_mib"], inference["peak_memory_mib"],
             setting(inference), inference["memory_kind"]),
            ("inference images/s", paper["images_per_s"], inference["images_per_s"], setting(inference),
             "model only, random inputs on the device"),
            ("training images/s", None, training["images_per_s"], setting(training),
             "not reported by the paper")]
    return pd.DataFrame(rows, columns=["quantity", "paper (RTX 4090, 224 px)", "ours", "our setting", "ours means"])


def benchmark_corruptions(image: np.ndarray, names: Sequence[str] | str | None = None,
                          severities: Sequence[int] | int = (1, 2, 3, 4, 5), repeats: int = 3,
                          seed: int = 0) -> pd.DataFrame:
    """Seconds per image of each corruption on ``image`` (mean over severities and repeats, after one warm-up call
    that absorbs one-off costs such as imports). A measurement for notebooks and benchmarks, not a test."""
    names, severities = check_names(CORRUPTIONS if names is None else names), check_severities(severities)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: expected an integer >= 1")
    rows = []
    for name in names:
        corrupt(image, name, severities[0], seed)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for s in severities:
                corrupt(image, name, s, seed)
        seconds = (time.perf_counter() - start) / (repeats * len(severities))
        rows.append({"group": GROUP_OF[name], "corruption": name, "image_px": f"{image.shape[0]}x{image.shape[1]}",
                     "seconds_per_image": seconds})
    return pd.DataFrame(rows)


def cost_model(backbone: str, arch: str = "tesla", sma: bool = False, sma_dim: int = 512, image_size: int = 224,
               num_activities: int = 3, num_seg_classes: int = 7, **options):
    """A model built only to count its costs: random-init weights (costs do not depend on them), the random-init
    warning silenced, seeded so that two calls build the same model."""
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", RandomInitWarning)
        torch.manual_seed(0)
        return build_model(backbone, arch, sma=sma, sma_dim=sma_dim, num_activities=num_activities,
                           num_seg_classes=num_seg_classes, image_size=image_size, **options)


def gflops_table(backbone: str, image_size: int, sma_dim: int, archs: Sequence[str] = ("hps", "tesla"),
                 **options) -> pd.DataFrame:
    """Forward GFLOPs per image (FlopCounterMode, a multiply-add = 2 FLOPs) with and without SMA for each
    architecture, split into backbone, SMA and heads, with SMA's share."""
    rows = []
    for a in archs:
        for with_sma in (False, True):
            g = count_gflops(cost_model(backbone, a, with_sma, sma_dim, image_size, **options), image_size,
                             by_component=True)
            rows.append({"backbone": backbone, "arch": a, "sma": with_sma, "sma_dim": sma_dim if with_sma else None,
                         "image_size": image_size, "gflops_total": g["total"], "gflops_sma": g["sma"],
                         "gflops_backbone": g["backbone"],
                         "gflops_heads": sum(v for k, v in g.items() if k.startswith("head."))})
    out = pd.DataFrame(rows)
    out["sma share"] = out["gflops_sma"] / out["gflops_total"]
    return out
