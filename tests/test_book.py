"""`make book` (``python scripts/notebook_outputs.py book``): the executed notebooks of results/executed/ and the guides
of docs/ as a static HTML book that reads offline.

One build into a temporary folder (about 25 s on 2 CPU cores), then what a reader relies on: every notebook has its
page, titled with the notebook's own first heading; pages link to the previous and next page in the notebooks'
order; Sphinx's search page and index exist and know the notebooks; every page says the results are SYNTHETIC; no
page loads a script, style sheet or image from the network. A second, tiny build shows that a Sphinx warning fails
the build (``-W``) instead of publishing a broken page.
"""
from __future__ import annotations

import html
import html.parser
import importlib.util
import re
import shutil
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("sphinx", reason="the book needs the docs extra: pip install -e '.[docs]'")
pytest.importorskip("myst_nb", reason="the book needs the docs extra: pip install -e '.[docs]'")
# myst-parser 5.2 uses Sphinx APIs that Sphinx 9 deprecates (RemovedInSphinx11Warning): theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = sorted((ROOT / "results" / "executed").glob("[0-9][0-9]_*.ipynb"))
GUIDES = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))


def _outputs_module():
    spec = importlib.util.spec_from_file_location("notebook_outputs", ROOT / "scripts" / "notebook_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book") / "html"
    index = _outputs_module().book(out)
    assert index == out / "index.html" and index.is_file()
    return out


def _first_heading(path: Path) -> str:
    """The notebook's first level-1 markdown heading, as plain text (read from the notebook, not from the book)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return re.sub(r"[`*]", "", line[2:]).strip()
    raise AssertionError(f"{path.name} has no '# ' heading")


class _Page(html.parser.HTMLParser):
    """The head's <title>, its rel=prev / rel=next links and every resource (script, style sheet, image, ...) the page
    loads."""

    def __init__(self):
        super().__init__()
        self.title, self.links, self.resources, self._in_title, self._depth = None, {}, [], False, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self._depth += 1
        if tag == "title" and self._depth == 0 and self.title is None:
            self._in_title, self.title = True, ""
        if tag == "link":
            for rel in (a.get("rel") or "").split():
                self.links[rel] = a.get("href")
            if set((a.get("rel") or "").split()) & {"stylesheet", "preload", "icon", "modulepreload", "prefetch"}:
                self.resources.append((tag, a.get("href")))
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed") and a.get("src"):
            self.resources.append((tag, a["src"]))
        if tag == "object" and a.get("data"):
            self.resources.append((tag, a["data"]))

    def handle_endtag(self, tag):
        if tag == "svg":
            self._depth -= 1
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _page(path: Path) -> _Page:
    parser = _Page()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_the_executed_notebooks_exist():
    assert len(EXECUTED) >= 12, EXECUTED


def test_every_notebook_has_a_page_with_its_own_title(book):
    for path in EXECUTED:
        page = book / "notebooks" / f"{path.stem}.html"
        assert page.is_file(), page
        title = html.unescape(_page(page).title or "")
        assert title.startswith(_first_heading(path)), (path.name, title)
        assert "Notebook" != title.strip()
        text = page.read_text(encoding="utf-8")
        assert 'class="output' in text or "cell_output" in text, f"{page.name}: no outputs rendered"
    # the titles differ from page to page (the old book titled every page "Notebook")
    titles = [_page(book / "notebooks" / f"{p.stem}.html").title for p in EXECUTED]
    assert len(set(titles)) == len(titles), titles


def test_every_guide_has_a_page(book):
    for stem in GUIDES:
        assert (book / f"{stem}.html").is_file(), stem
    assert (book / "provenance.html").is_file()


def test_pages_link_previous_and_next_in_the_notebooks_order(book):
    pages = [book / "notebooks" / f"{p.stem}.html" for p in EXECUTED]
    for before, page, after in zip(pages, pages[1:], pages[2:]):
        links = _page(page).links
        assert links.get("prev") == before.name and links.get("next") == after.name, (page.name, links)
        text = page.read_text(encoding="utf-8")
        assert f'class="prev-page" href="{before.name}"' in text and f'class="next-page" href="{after.name}"' in text
    assert _page(pages[0]).links.get("prev") == "../index.html"  # the first notebook follows the front page
    assert _page(book / "index.html").links.get("next") == f"notebooks/{pages[0].name}"
    # the sidebar of a page lists every other notebook
    sidebar = pages[0].read_text(encoding="utf-8")
    for page in pages[1:]:
        assert f'href="{page.name}"' in sidebar, page.name


def test_search_page_and_index_exist_and_know_the_notebooks(book):
    assert (book / "search.html").is_file()
    index = (book / "searchindex.js").read_text(encoding="utf-8")
    for path in EXECUTED:
        assert f'"notebooks/{path.stem}"' in index, path.stem
    assert '"robustness"' in index.lower() or "robust" in index.lower()  # words of the pages are indexed


def test_every_page_says_synthetic(book):
    for page in [book / "index.html", *sorted((book / "notebooks").glob("*.html"))]:
        text = page.read_text(encoding="utf-8")
        assert "SYNTHETIC data" in text and "synthetic-pretrained backbone" in text, page.name


def test_nothing_is_loaded_from_the_network(book):
    pages = sorted(book.rglob("*.html"))
    assert len(pages) >= len(EXECUTED) + len(GUIDES)
    remote = re.compile(r"^(https?:)?//", re.I)
    for page in pages:
        found = [(tag, src) for tag, src in _page(page).resources if src and remote.match(src.strip())]
        assert not found, (page.relative_to(book), found)
    for sheet in list(book.rglob("*.css")) + list(book.rglob("*.js")):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"""@import\s+(url\()?["']?(https?:)?//|url\(["']?(https?:)?//""", text), sheet


def test_the_checker_sees_a_remote_script():
    # the resource scan above finds what it looks for (a test that cannot fail is no test)
    parser = _Page()
    parser.feed('<html><head><title>x</title><script src="https://cdn.example/require.js"></script>'
                '<link rel="stylesheet" href="//cdn.example/a.css"></head><body><img src="local.png"></body></html>')
    assert parser.resources == [("script", "https://cdn.example/require.js"), ("link", "//cdn.example/a.css"),
                                ("img", "local.png")]


def test_a_sphinx_warning_fails_the_build(tmp_path, monkeypatch):
    module = _outputs_module()
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy2(ROOT / "docs" / "conf.py", docs / "conf.py")
    (docs / "index.md").write_text("# Front\n\n```{toctree}\n:glob:\n\nnotebooks/*\nprovenance\n```\n")
    (docs / "orphan.md").write_text("# A page in no table of contents\n\nSee [nowhere](missing.md).\n")
    monkeypatch.setattr(module, "DOCS", docs)
    monkeypatch.setattr(module, "EXECUTED", tmp_path / "executed")
    (tmp_path / "executed").mkdir()
    shutil.copy2(EXECUTED[0], tmp_path / "executed" / EXECUTED[0].name)
    with pytest.raises(SystemExit, match="sphinx-build failed"):
        module.book(tmp_path / "out")
    (docs / "orphan.md").unlink()
    index = module.book(tmp_path / "out")  # the same sources without the faulty page build
    assert (index.parent / "notebooks" / f"{EXECUTED[0].stem}.html").is_file()


def test_without_executed_notebooks_the_book_says_what_to_run(tmp_path, monkeypatch):
    module = _outputs_module()
    monkeypatch.setattr(module, "EXECUTED", tmp_path)
    with pytest.raises(SystemExit, match="make executed"):
        module.book(tmp_path / "out")
