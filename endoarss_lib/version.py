"""Version information, in one module that the rest of the package imports (and that imports nothing of it):
the package version and the git commit of the checkout that produced a result."""
from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["__version__", "git_commit"]

__version__ = "0.2.0"


def git_commit() -> str:
    """Short hash of the endoarss checkout holding this package, or 'unknown' (an installed package, git missing).

    Only a checkout whose top level holds this very package counts: an installed copy inside some other git
    repository (a virtualenv in a user's project) must not report that repository's commit."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], cwd=package, text=True,
                             capture_output=True, timeout=5)
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 2 or (Path(lines[0]).resolve() / package.name) != package:
            return "unknown"
        return lines[1]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
