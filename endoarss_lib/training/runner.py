"""The one experiment runner: run a set of named run configs, in this process or a local pool (one job per GPU).

:func:`run_grid` fits every configuration (finished runs are returned from their ``result.json``, interrupted ones
resume) and returns one result row per configuration; a configuration that fails is reported in its row (``status``
``failed``, ``error``) and the others go on. :func:`grid` and :func:`single_task_baselines` build the named configs.
The notebook sweep (:mod:`endoarss_lib.experiments.sweep`) re-executes notebooks with parameters and uses the same pool.
"""
from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from . import engine
from .console import WORKER_FORMAT, show_progress, shown_level

__all__ = ["run_grid", "grid", "visible_gpus", "gpu_slots", "process_pool", "auto_jobs"]


def grid(**axes: Sequence) -> list[dict]:
    """Cartesian product of the axes as a list of dicts: ``grid(a=[1, 2], b=["x"])`` -> 2 dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else torch's device count (none on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable torch / CUDA means no GPUs
        return []


def gpu_slots(jobs: int, gpus: Sequence[str]) -> list[str | None]:
    """The GPU each of ``jobs`` workers pins itself to (round robin); None everywhere without GPUs."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(jobs)]


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def auto_jobs(n_runs: int, devices: Sequence[str] = ("cpu",), gpus: Sequence[str] | None = None) -> int:
    """How many runs to train at once when ``jobs=0``: one per visible GPU when the runs use CUDA, else one per CPU
    core (each worker then uses ``cores // jobs`` threads), at most ``n_runs`` and at most 8 on a CPU (memory).
    Measured on 2 cores with the small default models: 4 runs took 1.08x less time as two 1-thread workers than one
    after the other on 2 threads (a small gain: the runs are compute-bound either way)."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    if gpus and any(str(d).startswith(("cuda", "auto")) for d in devices):
        return max(1, min(n_runs, len(gpus)))
    return max(1, min(n_runs, cpu_cores(), 8))


def _init_worker(slots, threads: int | None = None, log_level: int | None = None) -> None:
    """Pool initializer: take one GPU slot and expose only that GPU to this worker (or use ``threads`` CPU threads);
    show the package's log lines on stderr as the pool's owner did (``log_level``); die with the parent."""
    if log_level is not None:
        show_progress(log_level, fmt=WORKER_FORMAT)
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    elif threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    _die_with_parent()


def _die_with_parent() -> None:
    """Kill this worker when the process that made the pool dies (even by SIGKILL), so no orphan keeps writing into
    run folders that a rerun then uses.

    A forkserver worker's parent is the fork server, which outlives the pool's owner while any worker holds its
    pipe: a kernel death signal (Linux PR_SET_PDEATHSIG) alone would wait forever. So a watcher thread waits on the
    owner's sentinel (the pipe ``multiprocessing`` keeps to the real parent, at EOF when it dies) and exits; the
    death signal stays as the immediate path for spawned workers."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: the watcher above still applies
        pass


def _context():
    """Clean workers (no kernel-client, thread or CUDA state of ours): a preloaded fork server, else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["endoarss_lib"])  # the costly imports (torch), once
    return context


def process_pool(jobs: int, gpus: Sequence[str] = (), threads: int | None = None) -> ProcessPoolExecutor:
    """A pool of ``jobs`` workers, each pinned to one GPU slot (round robin over ``gpus``; without GPUs each uses
    ``threads`` CPU threads, default torch's own choice) and dying with us. Where this process shows the package's
    log lines (:func:`~endoarss_lib.training.console.show_progress`), the workers show theirs at the same level, each
    line with the worker's process id."""
    context = _context()
    slots = context.Queue()
    for gpu in gpu_slots(jobs, gpus):
        slots.put(gpu)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                               initargs=(slots, threads, shown_level()))


def _fit_one(name: str, cfg_dict: dict) -> dict:
    try:
        return {"name": name, "status": "ok", **engine.fit(TrainConfig(**cfg_dict))}
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not stop the others
        return {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8)}


def run_grid(configs: Mapping[str, TrainConfig], jobs: int = 1, gpus: Sequence[str] | None = None,
             progress: bool = True, raise_on_failure: bool = True) -> pd.DataFrame:
    """Fit every named configuration; one result row per configuration (in the order given), ``name`` first.

    ``jobs > 1`` runs them in a local process pool, one job per GPU when GPUs are visible (``gpus``: the ids to use,
    default :func:`visible_gpus`); ``jobs=0`` picks :func:`auto_jobs` (on a CPU: one run per core, each on
    ``cores // jobs`` threads). Finished runs are reused however many jobs trained them. A failure is recorded in
    its row (``status`` failed, ``error``); with ``raise_on_failure`` a RuntimeError naming every failed
    configuration is raised once all have run.
    """
    items = [(name, cfg.to_dict()) for name, cfg in configs.items()]
    if jobs == 0:
        jobs = auto_jobs(len(items), [cfg.device for cfg in configs.values()], gpus)
    rows: dict[str, dict] = {}
    with tqdm(total=len(items), desc="runs", unit="run", disable=not progress) as bar:
        if jobs <= 1 or len(items) <= 1:
            for name, data in items:
                rows[name] = _fit_one(name, data)
                bar.update()
        else:
            gpus = visible_gpus() if gpus is None else list(gpus)
            workers = min(jobs, len(items))
            threads = None if gpus else max(1, cpu_cores() // workers)
            with process_pool(workers, gpus, threads) as pool:
                futures = {pool.submit(_fit_one, name, data): name for name, data in items}
                for future in as_completed(futures):
                    name = futures[future]
                    try:
                        rows[name] = future.result()
                    except Exception as exc:  # noqa: BLE001 - the worker itself died
                        rows[name] = {"name": name, "status": "failed", "error": f"worker died: {exc}"}
                    bar.update()
    failed = {n: r["error"] for n, r in rows.items() if r.get("status") == "failed"}
    if failed and raise_on_failure:
        lines = "\n".join(f"  {n}: {e}" for n, e in failed.items())
        raise RuntimeError(f"{len(failed)} of {len(items)} run(s) failed:\n{lines}")
    return pd.DataFrame([rows[name] for name, _ in items])
