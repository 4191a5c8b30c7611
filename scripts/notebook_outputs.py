"""Executed notebooks for reading without running, and a static HTML book of them.

    python scripts/notebook_outputs.py execute [NAME ...]   # -> results/executed/<name>.ipynb (make executed)
    python scripts/notebook_outputs.py book                 # -> results/book/index.html + one page each (make book)

``execute`` runs each notebook of ``notebooks/`` with its default parameters (papermill, working directory
``notebooks/``, as Jupyter does), keeps the outputs small (embedded PNGs palette-quantised, widget state dropped, long
text cut) and stamps the notebook's metadata with the commit, the parameters and the date that made it. ``book``
renders the executed notebooks with nbconvert into self-contained HTML pages and an index.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS, EXECUTED, BOOK = ROOT / "notebooks", ROOT / "results" / "executed", ROOT / "results" / "book"
MAX_TEXT = 6000  # characters kept per text output
PNG_COLOURS = 128


def _small_png(data: str) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    image.thumbnail((1100, 1100))
    buffer = io.BytesIO()
    image.quantize(PNG_COLOURS, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def shrink(nb) -> None:
    """Outputs small enough to commit: PNGs quantised, widget views replaced by their text, long text cut."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                data["image/png"] = _small_png(data["image/png"])
            data.pop("application/vnd.jupyter.widget-view+json", None)
            for key in ("text/plain", "text/html"):
                if key in data and len(data[key]) > MAX_TEXT:
                    data[key] = data[key][:MAX_TEXT] + "\n... (cut)"
            if out.get("output_type") == "stream" and len(out.get("text", "")) > MAX_TEXT:
                out["text"] = out["text"][:MAX_TEXT] + "\n... (cut)"


def execute(names: list[str]) -> None:
    import nbformat
    import papermill as pm

    from endoarss_lib.version import __version__, git_commit

    EXECUTED.mkdir(parents=True, exist_ok=True)
    paths = [NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] if names else sorted(
        NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        target = EXECUTED / path.name
        print(f"executing {path.name} ...", flush=True)
        started = dt.datetime.now(dt.timezone.utc)
        pm.execute_notebook(str(path), str(target), cwd=str(NOTEBOOKS), progress_bar=False, kernel_name="python3")
        nb = nbformat.read(target, as_version=4)
        shrink(nb)
        params = next((c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), "")
        nb.metadata["endoarss"] = {"commit": git_commit(), "library_version": __version__,
                                   "executed": started.isoformat(timespec="seconds"),
                                   "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds()),
                                   "parameters": "defaults of the parameters cell", "parameters_cell": params}
        nbformat.write(nb, target)
        print(f"  -> {target.relative_to(ROOT)} ({target.stat().st_size // 1024} KiB)", flush=True)


def book() -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    executed = sorted(EXECUTED.glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise SystemExit(f"no executed notebooks in {EXECUTED}: run `make executed` first")
    BOOK.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    entries = []
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        body, _ = exporter.from_notebook_node(nb)
        page = BOOK / f"{path.stem}.html"
        page.write_text(body)
        stamp = nb.metadata.get("endoarss", {})
        title = next((c.source.splitlines()[0].lstrip("# ") for c in nb.cells if c.cell_type == "markdown"), path.stem)
        entries.append(f'<li><a href="{page.name}">{html.escape(title)}</a> <small>(commit '
                       f'{html.escape(str(stamp.get("commit", "?")))}, executed {html.escape(str(stamp.get("executed", "?")))}'
                       f', {stamp.get("seconds", "?")} s)</small></li>')
    index = BOOK / "index.html"
    index.write_text("<!doctype html><html><head><meta charset='utf-8'><title>endoarss notebooks</title></head><body>"
                     "<h1>endoarss: the notebooks, executed on their default parameters</h1>"
                     "<p>SYNTHETIC data and the project's synthetic-pretrained backbone: these pages show the method "
                     "and the pipeline; they reproduce nothing of the paper.</p><ol>" + "".join(entries)
                     + "</ol></body></html>")
    print(f"book: {index} ({len(entries)} notebooks)")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("execute", "book"))
    p.add_argument("names", nargs="*", help="notebooks to execute (default: all)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "execute":
        execute(args.names)
    else:
        book()
    return 0


if __name__ == "__main__":
    sys.exit(main())
