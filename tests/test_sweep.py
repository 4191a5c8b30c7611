"""The papermill sweep on a 3-configuration smoke grid: failure isolation, skip-finished, retry, jobs, aggregation."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
import yaml

from endoarss_lib.experiments.results import ROWS_FILE
from endoarss_lib.experiments.sweep import (STATUS_FILE, Config, GridError, config_id, config_state, expand, gpu_slots,
                                            load_grid, main, run_sweep, visible_gpus)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

NOTEBOOK = Path(__file__).parent / "data" / "sweep_notebook.ipynb"
REPO = Path(__file__).resolve().parents[1]
TRACE_COLUMNS = ["sweep_config_id", "sweep_git_commit", "config_hash", "git_commit", "seed", "data", "pretrained"]


def _write_grid(folder: Path, flag: Path) -> Path:
    """Three configurations; x=3 fails while ``flag`` exists."""
    grid = {"name": "smoke", "notebook": str(NOTEBOOK), "parameters": {"seed": 0},
            "configurations": [{"x": 1}, {"x": 2}, {"x": 3, "fail_if_exists": str(flag)}], "summary_by": ["x"]}
    path = folder / "smoke.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _snapshot(root: Path, grid: Path) -> SimpleNamespace:
    """What a sweep left on disk: configurations, statuses, files, executed-notebook mtimes, the table."""
    configs = expand(load_grid(grid), root)
    table = root / "results" / "tables" / "smoke.csv"
    return SimpleNamespace(
        configs=configs, by_x={c.parameters["x"]: c for c in configs},
        statuses={c.parameters["x"]: json.loads((c.folder / STATUS_FILE).read_text()) for c in configs},
        files={str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()},
        mtimes={c.parameters["x"]: c.executed.stat().st_mtime_ns for c in configs if c.executed.exists()},
        table=pd.read_csv(table) if table.exists() else None)


def _main(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def flag(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flags") / "fail.flag"
    path.touch()
    return path


@pytest.fixture(scope="module")
def first(tmp_path_factory, flag) -> SimpleNamespace:
    """A sweep where x=3 fails, through the command line, one job."""
    root = tmp_path_factory.mktemp("sweep_a")
    grid = _write_grid(root, flag)
    code, output = _main([grid, "--root", root, "--jobs", 1])
    return SimpleNamespace(root=root, grid=grid, code=code, output=output, **vars(_snapshot(root, grid)))


@pytest.fixture(scope="module")
def parallel(first, tmp_path_factory) -> SimpleNamespace:
    """The same grid (x=3 still failing) from scratch with two jobs and two visible GPUs (ids only: no CUDA use)."""
    root = tmp_path_factory.mktemp("sweep_b")
    grid = root / "smoke.yaml"
    grid.write_text(first.grid.read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
        report = run_sweep(grid, root, jobs=2, progress=False)
    return SimpleNamespace(report=report, **vars(_snapshot(root, grid)))


@pytest.fixture(scope="module")
def second(first, parallel, flag) -> SimpleNamespace:
    """The first sweep again once x=3 can succeed: finished ones skipped, the failed one retried."""
    flag.unlink()
    report = run_sweep(first.grid, first.root, jobs=1, progress=False)
    return SimpleNamespace(report=report, **vars(_snapshot(first.root, first.grid)))


# ------------------------------------------------------------------------------------------------ smoke grid

def test_a_failure_is_reported_and_does_not_stop_the_others(first):
    failed = first.by_x[3]
    assert first.code == 1
    assert f"FAILED {failed.id}" in first.output and "failing on purpose (x=3)" in first.output
    assert [first.statuses[x]["status"] for x in (1, 2, 3)] == ["ok", "ok", "failed"]
    assert first.statuses[3]["error"].startswith("RuntimeError: failing on purpose (x=3)")
    assert first.statuses[1]["parameters"] == {"seed": 0, "x": 1} and first.statuses[1]["error"] is None
    assert first.table["x"].tolist() == [1, 2]
    assert first.table["sweep_config_id"].tolist() == [first.by_x[1].id, first.by_x[2].id]
    assert first.table["test_cls_accuracy"].tolist() == [0.1, 0.2]


def test_every_row_is_traceable_to_its_run(first):
    for column in TRACE_COLUMNS:
        assert first.table[column].notna().all(), column
    for _, row in first.table.iterrows():
        rows = json.loads((first.root / row["sweep_run_dir"] / ROWS_FILE).read_text())
        assert rows[0]["config_hash"] == row["config_hash"] and rows[0]["x"] == row["x"]
        assert row["sweep_config_id"] == config_id(first.statuses[row["x"]]["parameters"])
    note = (first.root / "results" / "tables" / "smoke.md").read_text().splitlines()[0]
    assert "SYNTHETIC" in note and "2/3 configurations" in note


def test_outputs_are_atomic_and_a_failed_run_keeps_only_its_partial_notebook(first):
    for x in (1, 2):
        folder = first.by_x[x].folder.relative_to(first.root)
        assert {str(folder / n) for n in ("sweep_notebook.ipynb", ROWS_FILE, STATUS_FILE)} <= first.files
        executed = nbformat.read(first.by_x[x].executed, 4)
        injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert f"out_dir = \"{first.by_x[x].folder}\"" in injected.source
    failed = first.by_x[3].folder.relative_to(first.root)
    assert {f for f in first.files if f.startswith(str(failed))} == {
        str(failed / "sweep_notebook.failed.ipynb"), str(failed / STATUS_FILE)}
    assert not [f for f in first.files if ".running" in f or f.endswith(".tmp")]


def test_a_second_run_skips_finished_configurations_and_retries_the_failed_one(first, second):
    assert second.report.skipped == [first.by_x[1].id, first.by_x[2].id]
    assert second.report.ran == [first.by_x[3].id] and second.report.ok
    assert second.mtimes[1] == first.mtimes[1] and second.mtimes[2] == first.mtimes[2]
    assert second.statuses[3]["status"] == "ok"
    assert str(first.by_x[3].failed_notebook.relative_to(first.root)) not in second.files
    assert second.table["x"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(second.table.iloc[:2], first.table)  # rerun rows unchanged
    summary = pd.read_csv(first.root / "results" / "tables" / "smoke_summary.csv")
    assert summary["x"].tolist() == [1, 2, 3] and summary["seeds"].tolist() == [1, 1, 1]
    assert summary["sweep_config_ids"].tolist() == [c.id for c in first.configs]


def test_two_jobs_give_the_same_table_and_one_gpu_per_job(first, parallel):
    assert [c.id for c in parallel.configs] == [c.id for c in first.configs]
    assert parallel.report.ran == [first.by_x[1].id, first.by_x[2].id]
    assert list(parallel.report.failed) == [first.by_x[3].id]
    assert parallel.statuses[3]["error"] == first.statuses[3]["error"]
    assert set(parallel.table["cuda_visible_devices"].astype(str)) <= {"3", "5"}
    assert {s["cuda_visible_devices"] for s in parallel.statuses.values()} <= {"3", "5"}
    pd.testing.assert_frame_equal(parallel.table.drop(columns="cuda_visible_devices"),
                                  first.table.drop(columns="cuda_visible_devices"))


def test_aggregate_only_rebuilds_the_tables_without_running(first, second):
    tables = first.root / "results" / "tables"
    for path in tables.iterdir():
        path.unlink()
    report = run_sweep(first.grid, first.root, aggregate_only=True, progress=False)
    assert report.ran == [] and report.failed == {}
    pd.testing.assert_frame_equal(pd.read_csv(tables / "smoke.csv"), second.table)
    assert {c.parameters["x"]: c.executed.stat().st_mtime_ns for c in first.configs} == second.mtimes


def test_dry_run_lists_the_configurations_and_runs_nothing(first, second, tmp_path):
    assert run_sweep(first.grid, first.root, dry_run=True).states == {c.id: "done" for c in first.configs}
    code, output = _main([first.grid, "--dry-run", "--root", tmp_path])
    assert code == 0 and not (tmp_path / "results").exists()
    for config in first.configs:
        assert f"{config.id}  todo" in output


# ------------------------------------------------------------------------------------------------ units

def test_config_state_needs_ok_status_same_parameters_and_outputs(tmp_path):
    config = Config("abc", {"x": 1}, NOTEBOOK, tmp_path / "abc")
    assert config_state(config) == "todo"
    config.folder.mkdir()
    (config.folder / STATUS_FILE).write_text(json.dumps({"status": "ok", "parameters": {"x": 1}}))
    assert config_state(config) == "todo"  # no executed notebook / rows yet
    config.executed.write_text("{}")
    (config.folder / ROWS_FILE).write_text("[]")
    assert config_state(config) == "done"
    assert config_state(Config("abc", {"x": 2}, NOTEBOOK, config.folder)) == "todo"
    (config.folder / STATUS_FILE).write_text(json.dumps({"status": "failed", "parameters": {"x": 1}}))
    assert config_state(config) == "failed"


def test_expand_crosses_configurations_with_axes_and_hashes_parameters(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"notebook": str(NOTEBOOK), "parameters": {"seed": 0, "x": 9},
                                    "configurations": [{"x": 1}, {"x": 2}], "axes": {"fail": [False, True]}}))
    configs = expand(load_grid(path), tmp_path)
    assert [c.parameters for c in configs] == [{"seed": 0, "x": 1, "fail": False}, {"seed": 0, "x": 1, "fail": True},
                                               {"seed": 0, "x": 2, "fail": False}, {"seed": 0, "x": 2, "fail": True}]
    assert config_id({"a": 1, "b": [1, 2]}) == config_id({"b": [1, 2], "a": 1}) != config_id({"a": 2, "b": [1, 2]})
    assert configs[0].folder == tmp_path.resolve() / "results" / "runs" / "g" / configs[0].id
    assert len({c.id for c in configs}) == 4


@pytest.mark.parametrize("content, key", [
    ({"notebook": "nb.ipynb", "axis": {"x": [1]}}, "axis"),
    ({"parameters": {"x": 1}}, "notebook"),
    ({"notebook": "nb.ipynb", "axes": {"x": 1}}, "axes.x"),
    ({"notebook": "nb.ipynb", "axes": {"x": []}}, "axes.x"),
    ({"notebook": "nb.ipynb", "parameters": {"out_dir": "here"}}, "parameters"),
    ({"notebook": "nb.ipynb", "parameters": {"x": 1}, "axes": {"x": [1, 2]}}, "axes.x"),
    ({"notebook": "nb.ipynb", "configurations": [{"x": 1}, 3]}, "configurations[1]"),
    ({"notebook": "nb.ipynb", "name": "a b"}, "name"),
    ({"notebook": "nb.ipynb", "summary_by": "x"}, "summary_by"),
])
def test_bad_grid_files_name_the_file_and_the_key(tmp_path, content, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(GridError) as error:
        load_grid(path)
    assert str(path) in str(error.value) and f"key {key!r}" in str(error.value)


def test_missing_notebook_or_file_fails_clearly_and_the_cli_exits_2(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"notebook": "missing.ipynb"}))
    with pytest.raises(GridError, match="key 'notebook'.*missing.ipynb does not exist"):
        expand(load_grid(path), tmp_path)
    assert main([str(path), "--root", str(tmp_path)]) == 2
    assert "missing.ipynb" in capsys.readouterr().err
    with pytest.raises(GridError, match="cannot read"):
        load_grid(tmp_path / "nope.yaml")


def test_gpus_come_from_cuda_visible_devices_one_per_job(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 7")
    assert visible_gpus() == ["2", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    assert gpu_slots(2, ["2", "7"]) == ["2", "7"]
    assert gpu_slots(3, ["2", "7"]) == ["2", "7", "2"]
    assert gpu_slots(2, []) == [None, None]


def test_the_example_table2_grid_uses_the_main_results_notebook_parameters():
    grid = load_grid(REPO / "results" / "grids" / "table2_smoke.yaml")
    assert grid.notebook == "notebooks/02_main_results.ipynb"
    names = set(grid.parameters) | set(grid.axes)
    from endoarss_lib.evidence.variants import NOTEBOOK_VARIANTS

    # one notebook run per variant of notebook 02, every one of its variants once
    assert sorted(v for (v,) in grid.axes["variants"]) == sorted(NOTEBOOK_VARIANTS["02_main_results"])
    assert grid.parameters["scale"] == "test"
    notebook = REPO / grid.notebook
    if notebook.is_file():  # the notebook declares every parameter the grid passes
        import papermill
        assert names <= set(papermill.inspect_notebook(str(notebook)))
