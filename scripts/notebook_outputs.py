"""Executed notebooks for reading without running, the demonstration results they decide, and a static book.

    python scripts/notebook_outputs.py execute [NAME ...] [--scale demonstration|test]   # make executed
    python scripts/notebook_outputs.py collect                                          # (execute ends with it)
    python scripts/notebook_outputs.py check [PATH ...]                                 # whole outputs?
    python scripts/notebook_outputs.py book                                             # make book

``execute`` runs each notebook of ``notebooks/`` with ``scale`` (default ``demonstration``; every other parameter
at its default, which the scale fills in) through papermill (working directory ``notebooks/``, as Jupyter does),
writes it to ``results/executed/`` with its outputs whole (embedded PNGs palette-quantised, widget state dropped,
nothing cut) and stamps its metadata with the commit, whether the tree had uncommitted changes, the scale, the
parameters and the wall time. Trainings are cached in the run store (``results/runs``): an interrupted ``execute``
resumes where it stopped. At the demonstration scale it then ``collect``\s: every run the notebooks used is copied
(``config.json``, ``result.json``, ``test_per_image.npz``; never a checkpoint) to ``results/demonstration/<run>/``,
one row per run goes to ``results/tables/demonstration.csv`` and every notebook's claims to
``results/tables/claims.csv``.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import html.parser
import io
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS, EXECUTED, BOOK = ROOT / "notebooks", ROOT / "results" / "executed", ROOT / "results" / "book"
DEMONSTRATION, TABLES = ROOT / "results" / "demonstration", ROOT / "results" / "tables"
PNG_COLOURS = 128
_TABLE_TAGS = ("table", "thead", "tbody", "tr", "td", "th")


def _small_png(data: str) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    image.thumbnail((1100, 1100))
    buffer = io.BytesIO()
    image.quantize(PNG_COLOURS, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def shrink(nb) -> None:
    """Outputs small enough to commit without losing any: PNGs quantised, widget views replaced by their text."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                data["image/png"] = _small_png(data["image/png"])
            data.pop("application/vnd.jupyter.widget-view+json", None)


class _TagBalance(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.depth = {t: 0 for t in _TABLE_TAGS}
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.depth:
            self.depth[tag] += 1

    def handle_endtag(self, tag):
        if tag in self.depth:
            self.depth[tag] -= 1
            if self.depth[tag] < 0:
                self.problems.append(f"</{tag}> without <{tag}>")
                self.depth[tag] = 0


def output_problems(nb) -> list[str]:
    """Where an executed notebook's outputs are not whole: a cut marker, an HTML table whose tags do not balance, a
    pandas table shortened with '...' rows or columns."""
    problems = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] if out.get("output_type") == "stream" else []
            data = out.get("data", {})
            texts += [data.get("text/plain", ""), data.get("text/html", "")]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else text
                if "... (cut)" in text:
                    problems.append(f"cell {i}: an output was cut")
            markup = data.get("text/html", "")
            markup = "".join(markup) if isinstance(markup, list) else markup
            if markup:
                parser = _TagBalance()
                parser.feed(markup)
                parser.close()
                problems += [f"cell {i}: {p}" for p in parser.problems]
                problems += [f"cell {i}: <{t}> opened {d} more time(s) than closed" for t, d in parser.depth.items()
                             if d > 0]
                if "<td>...</td>" in markup or "<th>...</th>" in markup:
                    problems.append(f"cell {i}: a pandas table shortened with '...'")
    return problems


def _stamp(nb, scale: str, started: dt.datetime, parameters: dict) -> None:
    from endoarss_lib.version import __version__, git_commit

    params = next((c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), "")
    nb.metadata["endoarss"] = {
        "commit": git_commit(), "dirty": _dirty(), "library_version": __version__, "scale": scale,
        "executed": started.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds()),
        "parameters": parameters, "parameters_cell": params}


def _dirty() -> bool | None:
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def execute(names: list[str], scale: str = "demonstration") -> None:
    import nbformat
    import papermill as pm

    EXECUTED.mkdir(parents=True, exist_ok=True)
    paths = [NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] if names else sorted(
        NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        target = EXECUTED / path.name
        print(f"executing {path.name} at the {scale} scale ...", flush=True)
        started = dt.datetime.now(dt.timezone.utc)
        parameters = {"scale": scale}
        tmp = target.with_name(f".{target.name}.partial")
        pm.execute_notebook(str(path), str(tmp), parameters=parameters, cwd=str(NOTEBOOKS), progress_bar=False,
                            kernel_name="python3")
        nb = nbformat.read(tmp, as_version=4)
        shrink(nb)
        _stamp(nb, scale, started, parameters)
        problems = output_problems(nb)
        if problems:
            raise SystemExit(f"{path.name}: outputs not whole: {problems[:5]}")
        nbformat.write(nb, tmp)
        os.replace(tmp, target)
        print(f"  -> {target.relative_to(ROOT)} ({target.stat().st_size // 1024} KiB, "
              f"{nb.metadata['endoarss']['seconds']} s)", flush=True)
    if scale == "demonstration" and not names:
        collect()


_SMALL_FILES = ("config.json", "result.json", "test_per_image.npz")


def collect() -> None:
    """The demonstration's small outputs: run folders' config / result / per-image outcomes, demonstration.csv,
    claims.csv (from each notebook's output folder, written at the demonstration scale)."""
    import pandas as pd

    from endoarss_lib.results import demonstration_table

    rows, claims = [], []
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        out = ROOT / "results" / path.stem
        if (out / "rows.json").is_file():
            rows += [r for r in json.loads((out / "rows.json").read_text()) if r.get("scale") == "demonstration"]
        if (out / "claims.csv").is_file():
            frame = pd.read_csv(out / "claims.csv")
            claims.append(frame[frame["scale"] == "demonstration"])
    if not rows:
        raise SystemExit("no demonstration rows under results/<notebook>/rows.json: run `make executed` first")
    seen = {}
    for r in rows:
        seen.setdefault(r["run_dir"], r)
    DEMONSTRATION.mkdir(parents=True, exist_ok=True)
    for run_dir in seen:
        folder = Path(run_dir)
        folder = folder if folder.is_absolute() else ROOT / folder
        target = DEMONSTRATION / folder.name
        target.mkdir(exist_ok=True)
        for name in _SMALL_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, target / name)
    TABLES.mkdir(parents=True, exist_ok=True)
    table = demonstration_table(list(seen.values()))
    table.to_csv(TABLES / "demonstration.csv", index=False)
    if claims:
        frame = pd.concat(claims, ignore_index=True).drop_duplicates("claim", keep="last")
        frame.to_csv(TABLES / "claims.csv", index=False)
    per_class = ROOT / "results" / "07_segmentation_gallery" / "per_class.csv"
    if per_class.is_file():
        shutil.copy2(per_class, TABLES / "per_class_iou.csv")
    gallery = ROOT / "results" / "07_segmentation_gallery" / "gallery.png"
    if gallery.is_file():
        from endoarss_lib.viz import shrink_png

        shrink_png(gallery, ROOT / "results" / "figures" / "demonstration_gallery.png")
    update_readme()
    print(f"collect: {len(seen)} runs -> {DEMONSTRATION.relative_to(ROOT)}, "
          f"{TABLES.relative_to(ROOT)}/demonstration.csv, claims.csv ({sum(len(c) for c in claims)} claims)")


README_START, README_END = "<!-- measured:start -->", "<!-- measured:end -->"


def measured_markdown() -> str:
    """The README's Measured section, generated from the committed demonstration tables (never written by hand)."""
    import pandas as pd

    from endoarss_lib.evidence.variants import FEATURED, featured_label

    claims_path, demo_path = TABLES / "claims.csv", TABLES / "demonstration.csv"
    if not claims_path.is_file() or not demo_path.is_file():
        return ("No demonstration results are committed yet: `make executed` trains and decides them (see "
                "docs/evidence.md).")
    claims, demo = pd.read_csv(claims_path), pd.read_csv(demo_path)
    featured = demo[(demo["variant"] == FEATURED) & (demo["dataset"] == "mtlesd")]
    seeds = sorted(featured["seed"].unique().tolist())
    counts = claims["verdict"].value_counts()

    def spread(column):
        values = featured[column].dropna()
        return f"{values.mean():.3f} +- {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"

    lines = [f"Decided by `make executed` at the demonstration scale (SYNTHETIC data; the synthetic-pretrained "
             f"backbone `synthdino_vit_mini14`, not DINOv2; 240 / 96 images at 224 px; {len(demo)} runs; "
             f"mean +- std over seeds {seeds}; generated from `results/tables/claims.csv` and "
             f"`results/tables/demonstration.csv`).", "",
             f"**The featured model** ({featured_label()}): activity accuracy {spread('test_cls_accuracy')}, "
             f"foreground mIoU {spread('test_seg_miou_fg')}.", ""]
    iou = [c for c in featured if c.startswith("test_seg_iou_") and c != "test_seg_iou_background"]
    ceiling = TABLES / "per_class_iou.csv"
    ceilings = {}
    if ceiling.is_file():
        frame = pd.read_csv(ceiling)
        column = next((c for c in frame if c.startswith("patch ceiling")), None)
        if column:
            ceilings = dict(zip(frame["class"], frame[column]))
    lines += ["| class | IoU (mean +- std over seeds) | patch-grid ceiling |", "|---|---|---|"]
    for c in iou:
        name = c[len("test_seg_iou_"):]
        ceil = ceilings.get(name)
        lines.append(f"| {name} | {spread(c)} | {'-' if ceil is None else f'{ceil:.3f}'} |")
    lines += ["", f"**The paper's claims**: {int(counts.get('demonstrated', 0))} demonstrated, "
                  f"{int(counts.get('reversed', 0))} reversed, {int(counts.get('inconclusive', 0))} inconclusive "
                  "(a verdict needs both 95 % intervals, over the seeds and over the test images, on one side of 0).",
              "", "| notebook | claim | source | metric | mean difference | intervals | verdict |",
              "|---|---|---|---|---|---|---|"]
    for _, c in claims.iterrows():
        lines.append(f"| {c['notebook'][:2]} | {c['statement']} | {c['source']} | {c['metric']} | "
                     f"{c['mean_difference']:+.3f} | {c['interval']} | **{c['verdict']}** |")
    return "\n".join(lines)


def update_readme() -> None:
    """Replace the README's generated Measured section (between its markers)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"README.md has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{measured_markdown()}\n{README_END}{tail}")


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
    p.add_argument("what", choices=("execute", "collect", "check", "book"))
    p.add_argument("names", nargs="*", help="execute: notebooks (default: all); check: executed notebooks")
    p.add_argument("--scale", default="demonstration", choices=("demonstration", "test"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "execute":
        execute(args.names, args.scale)
    elif args.what == "collect":
        collect()
    elif args.what == "check":
        import nbformat

        paths = [Path(n) for n in args.names] or sorted(EXECUTED.glob("[0-9][0-9]_*.ipynb"))
        bad = {p.name: output_problems(nbformat.read(p, as_version=4)) for p in paths}
        bad = {k: v for k, v in bad.items() if v}
        for name, problems in bad.items():
            print(f"{name}: {problems}")
        return 1 if bad else 0
    else:
        book()
    return 0


if __name__ == "__main__":
    sys.exit(main())
