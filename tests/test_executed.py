"""The executed notebooks in results/executed/ (read without running) are those of today's notebooks on their default
parameters, stamped, free of errors and small; `make book` renders them into a static site (tests/test_book.py)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = ROOT / "results" / "executed"


def _parameters(nb) -> str:
    return next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def _outputs_module():
    spec = importlib.util.spec_from_file_location("notebook_outputs", ROOT / "scripts" / "notebook_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_copy_matches_the_notebook(source):
    target = EXECUTED / source.name
    assert target.is_file(), f"{target} missing: run `make executed NB={source.stem}`"
    nb, executed = nbformat.read(source, as_version=4), nbformat.read(target, as_version=4)
    stamp = executed.metadata.get("endoarss", {})
    assert re.fullmatch(r"[0-9a-f]{7,40}", str(stamp.get("commit", ""))), stamp
    assert stamp.get("parameters_cell") == _parameters(nb), (
        f"{target.name} was executed with other default parameters than {source.name} has now: "
        f"`make executed NB={source.stem}`")
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    ran = [c.source for c in executed.cells if c.cell_type == "code" and "injected-parameters" not in
           c.metadata.get("tags", [])]
    assert ran == code, f"{target.name}: its code differs from {source.name}: `make executed NB={source.stem}`"
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[:1]
    assert all(c.get("execution_count") for c in executed.cells if c.cell_type == "code" and c.source.strip())
    assert target.stat().st_size < 1_500_000, f"{target.name}: {target.stat().st_size} bytes (shrink the outputs)"


# `make book` (scripts/notebook_outputs.py book): tests/test_book.py builds the book and checks its pages.


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_outputs_are_whole_and_stamped(source):
    executed = nbformat.read(EXECUTED / source.name, as_version=4)
    assert _outputs_module().output_problems(executed) == []
    stamp = executed.metadata.get("endoarss", {})
    for key in ("commit", "scale", "parameters", "seconds", "dirty"):
        assert key in stamp, f"{source.name}: stamp without {key!r}: `make executed NB={source.stem}`"


def test_output_check_finds_cut_and_unbalanced_tables():
    import pandas as pd

    module = _outputs_module()
    html_table = pd.DataFrame({"a": range(80), "b": range(80)}).to_html()

    def notebook(markup):
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("x")
        cell.outputs = [nbformat.v4.new_output("execute_result", {"text/html": markup, "text/plain": "t"})]
        nb.cells = [cell]
        return nb

    assert module.output_problems(notebook(html_table)) == []
    assert any("opened" in p for p in module.output_problems(notebook(html_table[:len(html_table) // 2])))
    assert any("cut" in p for p in module.output_problems(notebook(html_table[:500] + "\n... (cut)")))
    with pd.option_context("display.max_rows", 10):
        shortened = pd.DataFrame({"a": range(80)})._repr_html_()
    assert any("shortened" in p for p in module.output_problems(notebook(shortened)))
