"""Version information, in one module that the rest of the package imports (and that imports nothing of it):
the package version and the git commit of the checkout that produced a result."""
from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["__version__", "git_commit"]

__version__ = "0.2.0"


def git_commit() -> str:
    """Short hash of the checkout holding this package, or 'unknown' (not a git checkout, git missing)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
