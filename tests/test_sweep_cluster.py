"""Cluster sweeps: the submitit path (``--executor submitit-local``: submitit's LocalExecutor, the Slurm executor's
code path with local processes) skips, retries, isolates failures and aggregates as the local executor does."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
import yaml
from tests.test_sweep import NOTEBOOK, _snapshot, _write_grid

from endoarss_lib.experiments.sweep import (JOB_FILE, STATUS_FILE, ExecutorError, SlurmOptions, _submitit_executor,
                                            expand, load_grid, main, run_sweep)

pytest.importorskip("submitit")  # the optional [cluster] dependency
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

LOCAL_JOBS = SlurmOptions(gpus_per_job=0, time_limit=10)  # no GPU here; a generous limit for slow machines


def _cluster(grid: Path, root: Path, **kw):
    return run_sweep(grid, root, executor="submitit-local", slurm=SlurmOptions(**{**vars(LOCAL_JOBS),
                                                                                  "folder": str(root / "slurm")}),
                     progress=False, poll_s=0.5, **kw)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The smoke grid (x=3 fails while its flag exists) by the local executor, then by submitit jobs, then the
    submitit sweep again once x=3 can succeed."""
    flag = tmp_path_factory.mktemp("flags") / "fail.flag"
    flag.touch()
    local_root, cluster_root = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("cluster")
    local_grid = _write_grid(local_root, flag)
    cluster_grid = cluster_root / "smoke.yaml"
    cluster_grid.write_text(local_grid.read_text())
    local_report = run_sweep(local_grid, local_root, jobs=1, progress=False)
    local = SimpleNamespace(report=local_report, **vars(_snapshot(local_root, local_grid)))
    first_report = _cluster(cluster_grid, cluster_root)
    first = SimpleNamespace(report=first_report, **vars(_snapshot(cluster_root, cluster_grid)))
    flag.unlink()
    second_report = _cluster(cluster_grid, cluster_root)
    second = SimpleNamespace(report=second_report, **vars(_snapshot(cluster_root, cluster_grid)))
    return SimpleNamespace(local=local, first=first, second=second, root=cluster_root)


def test_jobs_give_the_local_executors_statuses_and_table(sweeps):
    local, first = sweeps.local, sweeps.first
    assert [c.id for c in first.configs] == [c.id for c in local.configs]
    assert sorted(first.report.ran) == sorted(local.report.ran) == sorted([local.by_x[1].id, local.by_x[2].id])
    assert list(first.report.failed) == list(local.report.failed) == [local.by_x[3].id]
    assert [first.statuses[x]["status"] for x in (1, 2, 3)] == ["ok", "ok", "failed"]
    assert first.statuses[3]["error"] == local.statuses[3]["error"]  # the notebook's own error, as locally
    pd.testing.assert_frame_equal(first.table.drop(columns="cuda_visible_devices"),
                                  local.table.drop(columns="cuda_visible_devices"))
    for x in (1, 2, 3):  # every configuration records the job that ran it
        job = json.loads((first.by_x[x].folder / JOB_FILE).read_text())
        assert job["executor"] == "submitit-local" and job["job_id"] and Path(job["logs"]).is_relative_to(
            sweeps.root / "slurm")


def test_each_jobs_log_shows_its_notebooks_output_as_a_cluster_log_would(sweeps):
    """The training console's lines (the notebook's stderr) and its printed output reach the job's own log files."""
    for x in (1, 2):
        logs = Path(json.loads((sweeps.first.by_x[x].folder / JOB_FILE).read_text())["logs"])
        err = "".join(p.read_text() for p in logs.glob("*_log.err"))
        out = "".join(p.read_text() for p in logs.glob("*_log.out"))
        assert f"training x={x}" in err and "training x=" + str(3 - x) not in err
        assert f"configuration {sweeps.first.by_x[x].id}" in out and "rows.json" in out  # the path the notebook prints


def test_a_second_sweep_skips_finished_jobs_and_retries_the_failed_one(sweeps):
    first, second = sweeps.first, sweeps.second
    assert second.report.skipped == [first.by_x[1].id, first.by_x[2].id]
    assert second.report.ran == [first.by_x[3].id] and second.report.ok
    assert second.mtimes[1] == first.mtimes[1] and second.mtimes[2] == first.mtimes[2]
    assert second.table["x"].tolist() == [1, 2, 3]


def _killer_notebook(folder: Path) -> Path:
    """A notebook whose kernel kills the process running it (the job) when ``kill`` is true."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1\nkill = False\nout_dir = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os, signal\nif kill:\n    os.kill(os.getppid(), signal.SIGKILL)"),
                nbformat.v4.new_code_cell(
                    "from endoarss_lib.experiments.results import save_rows\n"
                    "row = {'dataset': 'synthetic_test', 'data': 'synthetic', 'backbone': 'none', 'arch': 'none', "
                    "'weighting': 'none', 'pretrained': 'random init', 'random_init_backbone': True, 'seed': 0, "
                    "'x': x, 'config_hash': str(x), 'git_commit': 'test', 'test_cls_accuracy': x / 10}\n"
                    "if out_dir is not None:\n    save_rows([row], out_dir, 'killer')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "killer.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_job_that_dies_is_recorded_and_the_others_finish(tmp_path):
    grid = tmp_path / "killer.yaml"
    grid.write_text(yaml.safe_dump({"name": "killer", "notebook": str(_killer_notebook(tmp_path)),
                                    "configurations": [{"x": 1}, {"x": 2, "kill": True}]}))
    report = _cluster(grid, tmp_path)
    configs = {c.parameters["x"]: c for c in expand(load_grid(grid), tmp_path)}
    assert report.ran == [configs[1].id] and list(report.failed) == [configs[2].id]
    status = json.loads((configs[2].folder / STATUS_FILE).read_text())
    job = json.loads((configs[2].folder / JOB_FILE).read_text())
    assert status["status"] == "failed" and status["error"].startswith(f"job {job['job_id']} failed")
    assert pd.read_csv(tmp_path / "results" / "tables" / "killer.csv")["x"].tolist() == [1]


def test_bad_executor_use_fails_before_any_work(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"notebook": str(Path(__file__).parent / "data" / "sweep_notebook.ipynb")}))
    with pytest.raises(ExecutorError, match="executor='pbs'"):
        run_sweep(grid, tmp_path, executor="pbs")
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert main([str(grid), "--root", str(tmp_path), "--executor", "slurm"]) == 2
    assert "pip install 'endoarss[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    with pytest.raises(SystemExit):
        main([str(grid), "--executor", "slurm", "--time-limit", "soon"])


def test_slurm_job_script_carries_the_options(tmp_path, monkeypatch):
    # no cluster here: a stand-in srun lets submitit build the job script, which is read, never submitted
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "table2", "notebook": str(NOTEBOOK)}))
    options = SlurmOptions(partition="gpu", gpus_per_job=2, cpus_per_job=8, time_limit=90,
                           folder=str(tmp_path / "slurm"), extra={"account": "abc"})
    with pytest.raises(ExecutorError, match="srun"):  # on this machine as it is: a clear error
        _submitit_executor("slurm", options, load_grid(grid), tmp_path, jobs=4)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor, folder = _submitit_executor("slurm", options, load_grid(grid), tmp_path, jobs=4)
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=8", "--time=90", "--account=abc",
                 "--job-name=sweep-table2", "--ntasks-per-node=1", f"--output={folder}/%j/"):
        assert f"#SBATCH {line}" in script, line
    assert executor._executor.parameters["array_parallelism"] == 4  # --jobs caps the array's running jobs
