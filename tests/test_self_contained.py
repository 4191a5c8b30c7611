"""The repository is self-contained: no tracked file (notebooks aside, which are checked elsewhere) points to a path
outside it, and every ``docs/*.md`` it cites exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# Paths that lead outside the repository: the design notes' folder beside the checkout, the machines' work folders,
# and users' home folders. (Joined from pieces so that this file does not match itself.)
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "shared/" + "spec", r"(?<![\w.])/" + "work/",
                               r"(?<![\w.])/home/[A-Za-z]", r"(?<![\w.])/Users/[A-Za-z]"]))
DOCS_REF = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)")


def _tracked_text_files() -> dict[str, str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): nothing to list")
    files = {}
    for name in out.stdout.decode().split("\0"):
        path = REPO / name
        if not name or name.endswith(".ipynb") or name == THIS or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, weights)
            continue
        files[name] = data.decode("utf-8", errors="replace")
    return files


def test_no_tracked_file_points_outside_the_repository():
    hits = [f"{name}:{i}: {line.strip()[:120]}" for name, text in _tracked_text_files().items()
            for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "references to paths outside the repository:\n" + "\n".join(hits)


def test_every_cited_docs_file_exists():
    missing = sorted({f"{name}: docs/{doc}" for name, text in _tracked_text_files().items()
                      for doc in DOCS_REF.findall(text) if not (REPO / "docs" / doc).is_file()})
    assert not missing, "cited docs files that do not exist:\n" + "\n".join(missing)


# pages the book build writes beside docs/ (scripts/notebook_outputs.py book): linked from docs, not files in docs/
BOOK_GENERATED = {"provenance.md"}


def test_links_between_docs_resolve():
    broken = []
    for page in sorted((REPO / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target in BOOK_GENERATED:
                continue
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken
    builder = (REPO / "scripts" / "notebook_outputs.py").read_text()
    assert all(f'"{name}"' in builder for name in BOOK_GENERATED), "a generated page the book builder no longer writes"
