"""Sweeps: a grid of papermill notebook runs, one executed notebook per configuration, aggregated into tables.

``python -m endoarss_lib.experiments.sweep GRID.yaml [--jobs N] [--dry-run] [--aggregate-only] [--root DIR]
[--executor local|slurm|submitit-local] [--partition P] [--gpus-per-job G] [--time-limit MIN] [--slurm-folder DIR]``

A grid file (YAML) names a notebook, fixed parameters and what to vary::

    name: table2_smoke                      # optional (default: the file's stem); names the output folders
    notebook: notebooks/02_main_results.ipynb   # relative to --root (default: the current directory)
    parameters: {dataset: mtlesd, epochs: 1}    # passed to every run
    configurations:                         # optional explicit list; each entry may override `parameters`
      - {backbones: [vit_tiny_patch14], archs: [tesla]}
    axes:                                   # optional; cartesian product, crossed with `configurations`
      seeds: [[0], [1]]                     # (a varied key may not also be in parameters / configurations)
    summary_by: [dataset, backbone, arch, weighting]   # optional; the keys of the seed summary table
    kernel: python3                         # optional; default: the notebook's kernel
    cell_timeout: 3600                      # optional; seconds per cell (default: none)

Each configuration's parameters get an id (a short hash) and a folder ``<root>/results/runs/<name>/<id>/`` holding the
executed notebook ``<notebook name>.ipynb`` (written under a temporary name, renamed when the run succeeds; a failed
run keeps its partial notebook as ``<notebook stem>.failed.ipynb`` for debugging), ``status.json`` (ok / failed, the
error, wall time, parameters, git commit) and whatever the notebook writes under ``out_dir`` (which the sweep sets to
that folder), including ``rows.json`` (:func:`endoarss_lib.experiments.results.save_rows`). A run must leave
``rows.json``. The kernel runs in the notebook's folder, so path parameters are relative to it (as with
``papermill --cwd``).

A configuration whose folder says ok for the same parameters is skipped; failed ones are retried. Several run at once
(``--jobs``; default one per visible GPU, each job pinned to one GPU through ``CUDA_VISIBLE_DEVICES``). A failure is
recorded and reported and does not stop the others; the exit code is 1 if any configuration failed. The rows of every
finished configuration become ``<root>/results/tables/<name>.csv`` / ``.md`` (every row, with its ``sweep_config_id``
beside the row's own config hash, commit, seed, data and weights) and ``<name>_summary.csv`` / ``.md`` (mean and std
over seeds per ``summary_by`` group, with the ids of the runs behind each line).

While it runs, a sweep holds ``results/runs/<name>/.sweep.lock``: a second sweep of the same grid is refused (the
lock of a killed sweep is taken over), the pool's workers die with the sweep, and temporaries a killed sweep left
are removed.

Executors (``--executor``): ``local`` (the default: this process, or a pool of ``--jobs`` processes, one per visible
GPU), ``slurm`` (one Slurm job per configuration, submitted as one job array through ``submitit``, at most ``--jobs``
running at once; ``--partition``, ``--gpus-per-job``, ``--cpus-per-job``, ``--time-limit`` in minutes or
``[H:]MM:SS``, ``--slurm-arg KEY=VALUE`` for further ``sbatch`` options such as ``account=...``; submitit's logs and
pickles under ``--slurm-folder``, default ``<root>/results/slurm/<name>/``) and ``submitit-local`` (the same
submitit path with the jobs as local processes: to try a cluster sweep's set-up without a cluster). Each job runs
:func:`run_config`, so skipping, retrying, failure isolation (a job that dies, times out or is cancelled is recorded
as failed with its job id and log folder; the others go on) and the tables are those of the local executor. The
sweep waits for its jobs and holds the grid's lock meanwhile (run it under ``tmux`` / ``nohup`` on a login node);
each configuration's folder records its job in ``job.json``. submitit is an optional dependency:
``pip install 'endoarss[cluster]'``.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml
from tqdm.auto import tqdm

from ..atomic import LockHeld, folder_lock, remove_stale_temporaries, write_json_atomic
from ..cli import add_standard_options, prog, run_command
from ..coerce import UniqueKeyLoader
from ..training.console import showing_progress
from ..training.runner import gpu_slots, process_pool, visible_gpus  # noqa: F401 (re-exported)
from ..version import git_commit
from .results import ROWS_FILE, load_rows, provenance_note, summarise_seeds, write_table

__all__ = ["GridError", "Grid", "Config", "SweepReport", "load_grid", "expand", "config_id", "config_state",
           "run_config", "run_sweep", "aggregate", "visible_gpus", "gpu_slots", "main", "STATUS_FILE", "LOCK_NAME",
           "LockHeld", "sweep_folder", "SlurmOptions", "ExecutorError", "EXECUTORS", "JOB_FILE"]

STATUS_FILE = "status.json"
JOB_FILE = "job.json"  # the cluster job that ran (or runs) a configuration
EXECUTORS = ("local", "slurm", "submitit-local")
LOCK_NAME = ".sweep.lock"  # in the grid's folder of run folders, while a sweep works there
RUNS_DIR, TABLES_DIR = Path("results/runs"), Path("results/tables")
_GRID_KEYS = {"name", "description", "notebook", "parameters", "configurations", "axes", "summary_by", "kernel",
              "cell_timeout"}
_RESERVED = {"out_dir"}
_SUMMARY_KEYS = ("experiment", "dataset", "data", "backbone", "sma", "arch", "weighting", "tasks", "image_size",
                 "epochs", "preset", "pretrained")


class GridError(ValueError):
    """A grid file that cannot be used: the message names the file and the key."""


class ExecutorError(RuntimeError):
    """An executor that cannot be used as asked (submitit missing, bad Slurm options)."""


@dataclass(frozen=True)
class SlurmOptions:
    """How the jobs of the ``slurm`` / ``submitit-local`` executors run: one job per configuration, one task."""

    partition: str | None = None  # None: the cluster's default partition
    gpus_per_job: int = 1
    cpus_per_job: int | None = None  # None: the cluster's default
    time_limit: int = 240  # minutes per job (a job past it is killed and recorded as failed)
    folder: str | None = None  # submitit's logs and pickles (None: <root>/results/slurm/<grid name>)
    extra: dict = field(default_factory=dict)  # further sbatch options, e.g. {"account": "abc", "qos": "high"}


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    path: Path
    name: str
    notebook: str
    parameters: dict
    configurations: list
    axes: dict
    summary_by: list | None = None
    kernel: str | None = None
    cell_timeout: float | None = None


@dataclass(frozen=True)
class Config:
    """One notebook run of a sweep: its id, parameters and folder."""

    id: str
    parameters: dict
    notebook: Path
    folder: Path

    @property
    def executed(self) -> Path:
        """The executed notebook of a successful run."""
        return self.folder / self.notebook.name

    @property
    def failed_notebook(self) -> Path:
        """The partial executed notebook a failed run leaves for debugging."""
        return self.folder / f"{self.notebook.stem}.failed.ipynb"


@dataclass
class SweepReport:
    """What a sweep did: every configuration's state and status, the failures and the tables written."""

    grid: Grid
    configs: list[Config]
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    tables: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no configuration failed."""
        return not self.failed


# ------------------------------------------------------------------------------------------------ grid files

def _fail(path, key: str, message: str) -> GridError:
    return GridError(f"{path}: key {key!r}: {message}")


def _parameters(value, path, key: str) -> dict:
    """A mapping of parameter names to values, without the keys the sweep sets itself."""
    value = {} if value is None else value
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(path, key, f"expected a mapping of parameter names to values, got {value!r}")
    bad = sorted(_RESERVED & set(value))
    if bad:
        raise _fail(path, key, f"{bad[0]!r} is set by the sweep (each run's folder); remove it")
    return dict(value)


def _configurations(data: dict, path) -> list[dict]:
    value = data.get("configurations") or []
    if not isinstance(value, list):
        raise _fail(path, "configurations", f"expected a list of mappings, got {type(value).__name__}")
    return [_parameters(item, path, f"configurations[{i}]") for i, item in enumerate(value)]


def _axes(data: dict, path) -> dict:
    axes = _parameters(data.get("axes"), path, "axes")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"axes.{key}", f"expected a non-empty list of values, got {values!r}")
    return axes


def _overlaps(grid_path, parameters: dict, configurations: list[dict], axes: dict) -> None:
    for key in axes:
        if key in parameters:
            raise _fail(grid_path, f"axes.{key}", "also set in 'parameters'; a parameter is either fixed or varied")
        for index, item in enumerate(configurations):
            if key in item:
                raise _fail(grid_path, f"configurations[{index}].{key}", "also varied in 'axes'")


def _read(path: Path) -> dict:
    """The grid file's top-level mapping, with only known keys."""
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a key given twice is refused, naming its lines
    except (OSError, yaml.YAMLError) as error:
        raise GridError(f"{path}: cannot read the grid file: {error}") from error
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a mapping with at least the key 'notebook', got {type(data).__name__}")
    unknown = sorted(set(data) - _GRID_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key; valid keys: {', '.join(sorted(_GRID_KEYS))}")
    return data


def _options(data: dict, path) -> dict:
    """summary_by, kernel and cell_timeout, checked."""
    summary_by, kernel, timeout = data.get("summary_by"), data.get("kernel"), data.get("cell_timeout")
    if summary_by is not None and (not isinstance(summary_by, list) or not all(isinstance(k, str) for k in summary_by)):
        raise _fail(path, "summary_by", f"expected a list of row column names, got {summary_by!r}")
    if kernel is not None and not isinstance(kernel, str):
        raise _fail(path, "kernel", f"expected a kernel name, got {kernel!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise _fail(path, "cell_timeout", f"expected a positive number of seconds, got {timeout!r}")
    return {"summary_by": summary_by, "kernel": kernel, "cell_timeout": timeout}


def load_grid(path: str | os.PathLike) -> Grid:
    """Parse and check a grid file; a :class:`GridError` names the file and the offending key."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data.get("notebook"), str) or not data["notebook"].endswith(".ipynb"):
        raise _fail(path, "notebook", f"expected the path of an .ipynb file, got {data.get('notebook')!r}")
    name = str(data.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        raise _fail(path, "name", f"{name!r}: use letters, digits, '_', '-', '.' (it names folders)")
    parameters = _parameters(data.get("parameters"), path, "parameters")
    configurations, axes = _configurations(data, path), _axes(data, path)
    _overlaps(path, parameters, configurations, axes)
    return Grid(path, name, data["notebook"], parameters, configurations, axes, **_options(data, path))


def config_id(parameters: dict) -> str:
    """Short, stable hash of a configuration's parameters (key order does not matter)."""
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _normalised(parameters: dict) -> dict:
    """Parameters as they read back from JSON (tuples become lists, odd YAML values strings)."""
    return json.loads(json.dumps(parameters, default=str))


def expand(grid: Grid, root: str | os.PathLike = ".") -> list[Config]:
    """Every configuration of a grid, in file order: (configurations or one empty one) x product(axes)."""
    root = Path(root).resolve()
    notebook = Path(grid.notebook) if Path(grid.notebook).is_absolute() else root / grid.notebook
    if not notebook.is_file():
        raise _fail(grid.path, "notebook", f"{notebook} does not exist (relative paths start at {root})")
    keys = list(grid.axes)
    configs, seen = [], set()
    for index, explicit in enumerate(grid.configurations or [{}]):
        for values in itertools.product(*grid.axes.values()):
            parameters = _normalised({**grid.parameters, **explicit, **dict(zip(keys, values))})
            cid = config_id(parameters)
            if cid in seen:
                raise _fail(grid.path, f"configurations[{index}]", f"repeats an earlier configuration: {parameters}")
            seen.add(cid)
            configs.append(Config(cid, parameters, notebook, root / RUNS_DIR / grid.name / cid))
    return configs


# ------------------------------------------------------------------------------------------------ running

def _read_status(config: Config) -> dict | None:
    try:
        return json.loads((config.folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def config_state(config: Config) -> str:
    """'done' (ok for these parameters, outputs present), 'failed', or 'todo'."""
    status = _read_status(config)
    if status is None or status.get("parameters") != config.parameters:
        return "todo"
    if status.get("status") == "ok" and config.executed.is_file() and (config.folder / ROWS_FILE).is_file():
        return "done"
    return "failed" if status.get("status") == "failed" else "todo"


def _error_text(error: BaseException) -> str:
    """'<Exception>: <message>' of a notebook error (papermill's own) or of the sweep's."""
    if hasattr(error, "ename"):
        return f"{error.ename}: {error.evalue} (cell {getattr(error, 'exec_count', '?')})"
    return f"{type(error).__name__}: {error}"


def _clear(config: Config) -> Path:
    """Remove what a previous attempt left (status first), return the temporary path of the executed notebook."""
    config.folder.mkdir(parents=True, exist_ok=True)
    partial = config.folder / f".{config.notebook.stem}.running.ipynb"
    for path in (config.folder / STATUS_FILE, config.folder / ROWS_FILE, config.executed, config.failed_notebook,
                 partial):
        path.unlink(missing_ok=True)
    return partial


def _execute(config: Config, partial: Path, kernel: str | None, cell_timeout: float | None,
             stream: bool = False) -> None:
    """Run the notebook into ``partial`` (papermill saves it after every cell); it must leave rows.json. ``stream``:
    also copy the notebook's printed output (the training console's lines, on its stderr) to this process's stdout and
    stderr as it comes, so that a cluster job's log shows the training (a local sweep's runs would interleave)."""
    import papermill

    papermill.execute_notebook(str(config.notebook), str(partial),
                               parameters={**config.parameters, "out_dir": str(config.folder)},
                               cwd=str(config.notebook.parent), kernel_name=kernel, progress_bar=False,
                               execution_timeout=cell_timeout,
                               stdout_file=sys.stdout if stream else None, stderr_file=sys.stderr if stream else None)
    if not (config.folder / ROWS_FILE).is_file():
        raise RuntimeError(f"the notebook finished without writing {ROWS_FILE} to out_dir (does it call "
                           f"endoarss_lib.experiments.results.save_rows(rows, out_dir, ...)?)")


def _status(config: Config, grid_name: str, error: str | None, started: float) -> dict:
    """The record of one attempt: outcome, error, parameters, where, when, how long, which commit."""
    return {"status": "failed" if error else "ok", "error": error, "config_id": config.id, "grid": grid_name,
            "parameters": config.parameters, "notebook": str(config.notebook),
            "executed_notebook": str(config.failed_notebook if error else config.executed),
            "out_dir": str(config.folder), "wall_time_s": round(time.time() - started, 2),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "git_commit": git_commit(),
            "host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run_config(config: Config, grid_name: str, kernel: str | None = None, cell_timeout: float | None = None,
               stream: bool = False) -> dict:
    """Execute one configuration's notebook; write and return its status (never raises for a notebook failure).
    ``stream``: the notebook's output goes to this process's stdout / stderr too (a cluster job's log)."""
    partial, started, error = _clear(config), time.time(), None
    if stream:
        print(f"sweep {grid_name}: configuration {config.id} -> {config.folder}", flush=True)
    try:
        _execute(config, partial, kernel, cell_timeout, stream=stream)
        os.replace(partial, config.executed)
    except Exception as exc:  # noqa: BLE001 - any failure of one configuration is recorded, never propagated
        error = _error_text(exc)
        if partial.exists():
            os.replace(partial, config.failed_notebook)
    status = _status(config, grid_name, error, started)
    write_json_atomic(config.folder / STATUS_FILE, status)
    return status


def _pool(jobs: int, gpus: Sequence[str]) -> ProcessPoolExecutor:
    return process_pool(jobs, gpus)


def _run_all(todo: list[Config], grid: Grid, jobs: int, gpus: Sequence[str], progress: bool) -> dict[str, dict]:
    """Run the configurations (in this process for one job, else a pool); their statuses by id."""
    statuses = {}
    with tqdm(total=len(todo), desc=f"sweep {grid.name}", unit="run", disable=not progress) as bar:
        if jobs == 1:
            for config in todo:
                statuses[config.id] = run_config(config, grid.name, grid.kernel, grid.cell_timeout)
                bar.update()
            return statuses
        with _pool(jobs, gpus) as pool:
            futures = {pool.submit(run_config, c, grid.name, grid.kernel, grid.cell_timeout): c for c in todo}
            for future in as_completed(futures):
                statuses[futures[future].id] = _result_or_failure(future, futures[future], grid.name)
                bar.update()
    return statuses


def _result_or_failure(future, config: Config, grid_name: str) -> dict:
    """A worker's status, or a failed status when the worker itself died."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - e.g. BrokenProcessPool: record it against this configuration
        return _failed_status(config, grid_name, f"worker failed: {type(exc).__name__}: {exc}")


def _submitit_executor(kind: str, options: SlurmOptions, grid: Grid, root: str | os.PathLike, jobs: int | None):
    """A submitit executor for ``kind`` ('slurm' or 'submitit-local') and the folder of its logs."""
    try:
        import submitit
    except ImportError:
        raise ExecutorError(f"--executor {kind} needs submitit, which is not installed: "
                            f"pip install 'endoarss[cluster]' (or pip install submitit)") from None
    folder = Path(options.folder) if options.folder else Path(root).resolve() / "results" / "slurm" / grid.name
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if kind == "slurm" else "local")
    except RuntimeError as error:  # e.g. no srun on this machine
        raise ExecutorError(f"--executor {kind}: {error} (run the sweep on the cluster's login node; "
                            f"--executor submitit-local runs the same jobs as local processes)") from None
    params = dict(name=f"sweep-{grid.name}", timeout_min=int(options.time_limit), nodes=1, tasks_per_node=1,
                  gpus_per_node=int(options.gpus_per_job), cpus_per_task=options.cpus_per_job)
    if kind == "slurm":
        params.update(slurm_partition=options.partition, slurm_array_parallelism=jobs,
                      slurm_additional_parameters=dict(options.extra) or None)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor, folder


def _job_failure(job, error: BaseException) -> str:
    """One line about a job that did not return a status: its id, what happened, where its logs are."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    logs = getattr(getattr(job, "paths", None), "folder", None)
    return f"job {job.job_id} failed: {type(error).__name__}: {first}" + (f" (logs: {logs})" if logs else "")


def _run_submitit(todo: list[Config], grid: Grid, executor, kind: str, progress: bool,
                  poll_s: float) -> dict[str, dict]:
    """Submit one job per configuration (a job array on Slurm), record each job, wait; their statuses by id."""
    from submitit.helpers import as_completed

    n = len(todo)
    jobs = executor.map_array(run_config, todo, [grid.name] * n, [grid.kernel] * n, [grid.cell_timeout] * n,
                              [True] * n)  # each job's log (submitit's <job>_0_log.out / .err) shows its training
    for config, job in zip(todo, jobs):
        write_json_atomic(config.folder / JOB_FILE, {"executor": kind, "job_id": job.job_id,
                                                     "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                     "logs": str(job.paths.folder)})
    statuses: dict[str, dict] = {}
    position = {id(job): i for i, job in enumerate(jobs)}
    with tqdm(total=n, desc=f"sweep {grid.name} ({kind})", unit="job", disable=not progress) as bar:
        for job in as_completed(jobs, poll_frequency=poll_s):
            config = todo[position[id(job)]]
            try:
                statuses[config.id] = job.result()
            except Exception as exc:  # noqa: BLE001 - the job died, timed out or was cancelled: record it, go on
                statuses[config.id] = _failed_status(config, grid.name, _job_failure(job, exc))
            bar.update()
    return statuses


def _failed_status(config: Config, grid_name: str, error: str) -> dict:
    """Record a configuration whose worker or job died before writing its own status."""
    status = {"status": "failed", "error": error, "config_id": config.id, "grid": grid_name,
              "parameters": config.parameters, "git_commit": git_commit()}
    write_json_atomic(config.folder / STATUS_FILE, status)
    return status


def sweep_folder(grid: Grid, root: str | os.PathLike = ".") -> Path:
    """The folder of a grid's run folders, ``<root>/results/runs/<name>``; it holds the sweep's lock."""
    return Path(root).resolve() / RUNS_DIR / grid.name


def _remove_stale(grid: Grid, root: str | os.PathLike) -> None:
    """Temporaries a killed sweep left in its run folders and tables (a live writer's younger file is kept)."""
    remove_stale_temporaries(sweep_folder(grid, root), recursive=True)
    remove_stale_temporaries(Path(root).resolve() / TABLES_DIR)


def run_sweep(grid_path: str | os.PathLike, root: str | os.PathLike = ".", jobs: int | None = None,
              dry_run: bool = False, aggregate_only: bool = False, progress: bool = True, executor: str = "local",
              slurm: SlurmOptions | None = None, poll_s: float = 15.0) -> SweepReport:
    """Run every unfinished configuration of a grid file, then aggregate the finished ones' rows into tables.

    ``executor``: 'local' (this process or a local pool), 'slurm' or 'submitit-local' (one submitit job per
    configuration, with ``slurm`` options; ``jobs`` then caps the jobs running at once on Slurm; ``poll_s``: how often
    job states are checked). Except for a dry run, the sweep holds the lock
    ``<root>/results/runs/<name>/.sweep.lock`` meanwhile: a second sweep of the same grid fails with
    :class:`~endoarss_lib.atomic.LockHeld` naming the lock and the owner's pid (the lock of a killed sweep is taken
    over)."""
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor={executor!r}: expected one of {', '.join(EXECUTORS)}")
    grid = load_grid(grid_path)
    configs = expand(grid, root)
    if dry_run:
        return SweepReport(grid, configs, states={c.id: config_state(c) for c in configs})
    submitit_executor = None
    if executor != "local" and not aggregate_only:  # a missing submitit or a bad option fails before any work
        submitit_executor, _ = _submitit_executor(executor, slurm or SlurmOptions(), grid, root, jobs)
    with folder_lock(sweep_folder(grid, root), LOCK_NAME, "sweep"):
        _remove_stale(grid, root)
        states = {c.id: config_state(c) for c in configs}
        report = SweepReport(grid, configs, states=states)
        if not aggregate_only:
            todo = [c for c in configs if states[c.id] != "done"]
            report.skipped = [c.id for c in configs if states[c.id] == "done"]
            if submitit_executor is not None:
                statuses = _run_submitit(todo, grid, submitit_executor, executor, progress, poll_s) if todo else {}
            else:
                gpus = visible_gpus()
                jobs = jobs or max(len(gpus), 1)
                statuses = _run_all(todo, grid, max(1, min(jobs, len(todo) or 1)), gpus, progress) if todo else {}
            report.ran = [c.id for c in todo if statuses[c.id]["status"] == "ok"]
            report.failed = {c.id: statuses[c.id]["error"] for c in todo if statuses[c.id]["status"] != "ok"}
        report.tables = aggregate(grid, configs, root)
    return report


# ------------------------------------------------------------------------------------------------ aggregation

def _rows_of(config: Config, grid_name: str, root: Path) -> pd.DataFrame:
    """A finished configuration's rows, with the sweep's id, grid, commit and folder in front."""
    rows = load_rows([config.folder])
    status = _read_status(config) or {}
    front = {"sweep_grid": grid_name, "sweep_config_id": config.id, "sweep_git_commit": status.get("git_commit"),
             "sweep_run_dir": os.path.relpath(config.folder, root)}
    for position, (key, value) in enumerate(front.items()):
        rows.insert(position, key, value)
    return rows


def _summary(rows: pd.DataFrame, by: Sequence[str] | None) -> pd.DataFrame | None:
    """Mean / std over seeds of the test metrics per group, with the run ids behind each line."""
    metrics = [c for c in rows if c.startswith("test_") and pd.api.types.is_numeric_dtype(rows[c])]
    by = [k for k in (by or _SUMMARY_KEYS) if k in rows]
    if not metrics or not by:
        return None
    table = summarise_seeds(rows, by, metrics)
    grouped = rows.groupby(by, sort=False, dropna=False)
    for column, source in (("sweep_config_ids", "sweep_config_id"), ("config_hashes", "config_hash"),
                           ("git_commits", "git_commit")):
        if source in rows:
            table[column] = grouped[source].agg(lambda s: " ".join(dict.fromkeys(s.dropna().astype(str)))).values
    return table


def aggregate(grid: Grid, configs: Sequence[Config], root: str | os.PathLike = ".") -> list[Path]:
    """Rows of every finished configuration -> ``results/tables/<name>.csv|.md`` and the seed summary."""
    root = Path(root).resolve()
    done = [c for c in configs if config_state(c) == "done"]
    if not done:
        return []
    rows = pd.concat([_rows_of(c, grid.name, root) for c in done], ignore_index=True)
    note = provenance_note(rows) or "provenance not recorded in the rows"
    stem = root / TABLES_DIR / grid.name
    paths = list(write_table(rows, stem, f"{note}; sweep {grid.name}, {len(done)}/{len(configs)} configurations"))
    summary = _summary(rows, grid.summary_by)
    if summary is not None:
        paths += write_table(summary, stem.with_name(f"{grid.name}_summary"), f"{note}; mean and std over seeds")
    return paths


# ------------------------------------------------------------------------------------------------ command line

def _print_plan(report: SweepReport) -> None:
    print(f"sweep {report.grid.name}: {len(report.configs)} configurations of {report.configs[0].notebook.name}"
          if report.configs else f"sweep {report.grid.name}: no configurations")
    for config in report.configs:
        print(f"  {config.id}  {report.states[config.id]:6s}  {json.dumps(config.parameters, default=str)}")


def _print_report(report: SweepReport) -> None:
    print(f"sweep {report.grid.name}: {len(report.configs)} configurations: {len(report.skipped)} already done, "
          f"{len(report.ran)} ran ok, {len(report.failed)} failed")
    for cid, error in report.failed.items():
        config = next(c for c in report.configs if c.id == cid)
        print(f"  FAILED {cid} {json.dumps(config.parameters, default=str)}\n    {error}\n    see "
              f"{config.folder / STATUS_FILE} and {config.failed_notebook}")
    for path in report.tables:
        print(f"  table: {path}")


def _minutes(text: str) -> int:
    """A time limit in whole minutes from ``90``, ``1:30:00`` or ``45:00`` (rounded up); argparse error else."""
    try:
        parts = [int(p) for p in str(text).split(":")]
        if len(parts) == 1:
            seconds = parts[0] * 60
        elif len(parts) in (2, 3):
            seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected minutes or [H:]MM:SS") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive time")
    return -(-seconds // 60)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; exit code 0 (all ok), 1 (a configuration failed) or 2 (bad grid file, another
    sweep holds the grid's lock, or the executor cannot be used)."""
    parser = argparse.ArgumentParser(prog=prog("endoarss_lib.experiments.sweep", "endoarss-sweep"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_standard_options(parser)
    parser.add_argument("grid", help="grid file (YAML)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: visible GPUs, or 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the configurations and their state; run none")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables from finished runs")
    parser.add_argument("--root", default=".", help="folder holding results/ (and relative notebook paths)")
    cluster = parser.add_argument_group("cluster (--executor slurm | submitit-local; pip install 'endoarss[cluster]')")
    cluster.add_argument("--executor", default="local", choices=EXECUTORS,
                         help="local: this machine (default); slurm: one Slurm job per configuration (submitit); "
                              "submitit-local: the submitit path with local processes")
    cluster.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    cluster.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job (default 1)")
    cluster.add_argument("--cpus-per-job", type=int, default=None, help="CPUs per job (default: the cluster's)")
    cluster.add_argument("--time-limit", default="240", type=_minutes,
                         help="time limit per job: minutes, or [H:]MM:SS (default 240 minutes)")
    cluster.add_argument("--slurm-folder", default=None,
                         help="submitit's logs and pickles (default: <root>/results/slurm/<grid name>)")
    cluster.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                         help="a further sbatch option, e.g. account=abc or qos=high (repeatable)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.gpus_per_job < 0 or (args.cpus_per_job is not None and args.cpus_per_job < 1):
        parser.error("--gpus-per-job must be >= 0 and --cpus-per-job >= 1")
    extra = dict(item.split("=", 1) for item in args.slurm_arg if "=" in item)
    if len(extra) != len(args.slurm_arg):
        parser.error("--slurm-arg expects KEY=VALUE")
    slurm = SlurmOptions(args.partition, args.gpus_per_job, args.cpus_per_job, args.time_limit, args.slurm_folder,
                         extra)

    def work() -> int:
        report = run_sweep(args.grid, args.root, args.jobs, args.dry_run, args.aggregate_only,
                           executor=args.executor, slurm=slurm)
        (_print_plan if args.dry_run else _print_report)(report)
        return 1 if report.failed else 0

    with showing_progress("info"):  # the runs' start and epoch lines on stderr (runs trained in this process)
        return run_command(work, debug=args.debug, usage=(GridError, LockHeld, ExecutorError))


if __name__ == "__main__":
    sys.exit(main())
