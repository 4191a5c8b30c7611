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
resumes where it stopped. At the demonstration scale it then runs ``collect``: every run the notebooks used is copied
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
    """Whether tracked files other than results/ (what ``execute`` itself writes) differ from the commit."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
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

    from endoarss_lib.experiments.results import demonstration_table

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
    gallery_tables = ROOT / "results" / "07_segmentation_gallery"
    for name, target in (("per_class.csv", "per_class_iou.csv"), ("activity_ceiling.csv", "activity_ceiling.csv")):
        if (gallery_tables / name).is_file():
            shutil.copy2(gallery_tables / name, TABLES / target)
    gallery = gallery_tables / "gallery.png"
    if gallery.is_file():
        from endoarss_lib.experiments.viz import shrink_png

        shrink_png(gallery, ROOT / "results" / "figures" / "demonstration_gallery.png")
    update_readme()
    print(f"collect: {len(seen)} runs -> {DEMONSTRATION.relative_to(ROOT)}, "
          f"{TABLES.relative_to(ROOT)}/demonstration.csv, claims.csv ({sum(len(c) for c in claims)} claims)")


README_START, README_END = "<!-- measured:start -->", "<!-- measured:end -->"


SEG_GOALS = {"fg_miou": 0.5, "class_iou": 0.2}  # issue 20's goals for the featured model's segmentation


def _scales() -> dict[str, str]:
    """``{notebook: the scale of its committed executed copy}`` (``"not executed"`` where there is none)."""
    import nbformat

    out = {}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        target = EXECUTED / path.name
        out[path.stem] = (nbformat.read(target, as_version=4).metadata.get("endoarss", {}).get("scale", "?")
                          if target.is_file() else "not executed")
    return out


def measured_markdown() -> str:
    """The README's Measured section, generated from the committed demonstration tables (never written by hand):
    which notebooks are decided so far, the featured model's numbers against the segmentation goals, every verdict."""
    import pandas as pd

    from endoarss_lib.evidence.variants import FEATURED, featured_label

    claims_path, demo_path = TABLES / "claims.csv", TABLES / "demonstration.csv"
    if not claims_path.is_file() or not demo_path.is_file():
        return ("No demonstration results are committed yet: `make executed` trains and decides them (see "
                "docs/evidence.md).")
    claims, demo = pd.read_csv(claims_path), pd.read_csv(demo_path)
    scales = _scales()
    decided = [nb for nb, sc in scales.items() if sc == "demonstration"]
    pending = [nb for nb, sc in scales.items() if sc != "demonstration"]
    featured = demo[(demo["variant"] == FEATURED) & (demo["dataset"] == "mtlesd")]
    seeds = sorted(featured["seed"].unique().tolist())
    counts = claims["verdict"].value_counts()

    def spread(column):
        values = featured[column].dropna()
        if values.empty:
            return "-"
        return f"{values.mean():.3f} +- {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"

    lines = [f"Decided at the demonstration scale (SYNTHETIC data; the synthetic-pretrained backbone "
             f"`synthdino_vit_mini14`, not DINOv2; 240 / 96 images at 224 px; mean +- std over seeds; generated by "
             f"`scripts/notebook_outputs.py collect` from `results/tables/claims.csv` and "
             f"`results/tables/demonstration.csv`, {len(demo)} runs).", ""]
    if pending:
        lines += [f"**In progress**: executed at the demonstration scale so far: "
                  f"{', '.join(f'`{nb}`' for nb in decided) or 'none'}; still at the test scale, their claims not "
                  f"decided yet: {', '.join(f'`{nb}`' for nb in pending)} (`python scripts/demonstration_runs.py` "
                  "resumes the trainings, then `make executed`).", ""]
    if featured.empty:
        lines += [f"**The featured model** ({featured_label()}) on MTLESD: no notebook executed at this scale has "
                  "reported it yet.", ""]
    else:
        oracle = ""
        if (TABLES / "activity_ceiling.csv").is_file():
            frame = pd.read_csv(TABLES / "activity_ceiling.csv")
            merged = frame[frame["predictor"].str.contains("pairs merged")]["test activity accuracy"]
            if len(merged):
                oracle = (f" (the data's activity ceiling, an oracle that sees the true mask's classes with each "
                          f"look-alike pair merged: {merged.iloc[0]:.3f})")
        lines += [f"**The featured model** ({featured_label()}; seeds {seeds}): activity accuracy "
                  f"{spread('test_cls_accuracy')}{oracle}, foreground mIoU {spread('test_seg_miou_fg')}.", ""]
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
        fg = featured["test_seg_miou_fg"].mean()
        low = [c[len("test_seg_iou_"):] for c in iou if featured[c].mean() < SEG_GOALS["class_iou"]]
        lines += ["", f"Segmentation goals (means over the seeds): foreground mIoU >= {SEG_GOALS['fg_miou']}: "
                      f"**{'met' if fg >= SEG_GOALS['fg_miou'] else 'missed'}** ({fg:.3f}); every foreground "
                      f"class's IoU >= {SEG_GOALS['class_iou']}: **{'met' if not low else 'missed'}**"
                      + (f" (below: {', '.join(low)})" if low else "") + "."]
    lines += ["", f"**The paper's claims decided so far**: {int(counts.get('demonstrated', 0))} demonstrated, "
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


DOCS = ROOT / "docs"


def _provenance(executed: list[Path]) -> str:
    """The book's page on how its notebooks were made: each one's commit, scale, wall time and date (its stamp)."""
    import nbformat

    lines = ["# How these pages were made", "",
             "Each notebook page is the copy in `results/executed/` that `make executed` (`python "
             "scripts/notebook_outputs.py execute`) wrote: run on its default parameters with papermill on SYNTHETIC "
             "data and the synthetic-pretrained backbone, its outputs kept whole, its metadata stamped. The book shows "
             "them as they are (`nb_execution_mode = \"off\"` in `docs/conf.py`): building it executes nothing.", "",
             "| notebook | commit | uncommitted changes | scale | executed (UTC) | seconds |",
             "|---|---|---|---|---|---|"]
    for path in executed:
        stamp = nbformat.read(path, as_version=4).metadata.get("endoarss", {})
        dirty = {True: "yes", False: "no"}.get(stamp.get("dirty"), "?")
        lines.append(f"| [{path.stem}](notebooks/{path.name}) | `{stamp.get('commit', '?')}` | {dirty} | "
                     f"{stamp.get('scale', '?')} | {stamp.get('executed', '?')} | {stamp.get('seconds', '?')} |")
    return "\n".join(lines) + "\n"


def book(out: Path | None = None) -> Path:
    """The executed notebooks and the guides of docs/ as a static, offline HTML book (Sphinx + myst-nb, furo theme)
    in ``out`` (default ``results/book``); returns its ``index.html``.

    docs/ (``conf.py``, ``index.md``, the guides, ``img/``) and ``results/executed/*.ipynb`` (as ``notebooks/``) are
    staged into a temporary source tree, with a generated ``provenance.md`` (each notebook's stamp), and built with
    ``-W``: any Sphinx warning (a broken link, a page outside the table of contents) fails the build. Nothing is
    executed (``nb_execution_mode = "off"``)."""
    import tempfile

    try:
        from sphinx.cmd.build import build_main
    except ImportError:
        raise SystemExit("book: Sphinx is not installed: pip install -c constraints.txt -e \".[docs]\"") from None
    out = Path(out) if out is not None else BOOK
    executed = sorted(EXECUTED.glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise SystemExit(f"no executed notebooks in {EXECUTED}: run `make executed` first")
    with tempfile.TemporaryDirectory(prefix="endoarss_book_") as tmp:
        source, doctrees = Path(tmp) / "source", Path(tmp) / "doctrees"
        shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "__pycache__", ".*"))
        (source / "notebooks").mkdir()
        for path in executed:
            shutil.copy2(path, source / "notebooks" / path.name)
        (source / "provenance.md").write_text(_provenance(executed))
        if out.exists():
            shutil.rmtree(out)
        status = build_main(["-W", "--keep-going", "-q", "-E", "-b", "html", "-d", str(doctrees), str(source),
                             str(out)])
    if status != 0:
        raise SystemExit(f"book: sphinx-build failed (exit {status}): the warnings above name the page and line (a "
                         "temporary copy: source/X is docs/X, source/notebooks/X is results/executed/X)")
    index = out / "index.html"
    print(f"book: {index} ({len(executed)} notebooks and the guides of docs/)")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("execute", "collect", "check", "book"))
    p.add_argument("names", nargs="*", help="execute: notebooks (default: all); check: executed notebooks")
    p.add_argument("--scale", default="demonstration", choices=("demonstration", "test"))
    p.add_argument("--out", help="book: the output folder (default results/book)")
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
        book(Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
