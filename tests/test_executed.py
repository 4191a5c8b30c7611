"""The executed notebooks in results/executed/ (read without running) are those of today's notebooks on their default
parameters, stamped, free of errors and small; `make book` renders them into a static site."""
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


def test_book_renders_every_executed_notebook(tmp_path, monkeypatch):
    module = _outputs_module()
    monkeypatch.setattr(module, "BOOK", tmp_path / "book")
    index = module.book()
    text = index.read_text()
    for source in NOTEBOOKS:
        page = tmp_path / "book" / f"{source.stem}.html"
        assert page.is_file() and page.stat().st_size > 10_000, page
        assert f'href="{page.name}"' in text
    assert "SYNTHETIC data" in text
