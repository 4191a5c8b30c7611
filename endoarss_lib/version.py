"""Version information, in one module that the rest of the package imports (and that imports nothing of it):
the package version, the git commit of the checkout that produced a result and whether it had uncommitted changes,
and the software and hardware it ran on (:func:`environment`), all recorded in every result row."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__all__ = ["__version__", "git_commit", "git_dirty", "environment", "provenance"]

__version__ = "0.2.0"


def _checkout() -> Path | None:
    """The top level of the endoarss checkout holding this package, or None (an installed package, git missing).

    Only a checkout whose top level holds this very package counts: an installed copy inside some other git
    repository (a virtualenv in a user's project) must not report that repository's state."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, text=True, capture_output=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    top = out.stdout.strip()
    if out.returncode != 0 or not top or (Path(top).resolve() / package.name) != package:
        return None
    return Path(top)


def git_commit() -> str:
    """Short hash of the endoarss checkout holding this package, or 'unknown' (an installed package, git missing)."""
    top = _checkout()
    if top is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=top, text=True, capture_output=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def git_dirty() -> bool | None:
    """Whether the endoarss checkout has uncommitted changes (modified, staged or untracked files that git does not
    ignore), so a result may come from code no commit holds; None when this is not a git checkout."""
    top = _checkout()
    if top is None:
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=top, text=True,
                             capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(device=None) -> dict:
    """The software and hardware a result came from: Python version and platform, torch, its CUDA and cuDNN
    versions (None in a CPU-only build), and the name of the GPU ``device`` is (None on the CPU)."""
    import torch  # imported here: the package version must be readable without torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpu = None
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"python_version": platform.python_version(), "platform": platform.platform(),
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "cudnn_version": cudnn, "gpu_name": gpu}


def provenance(device=None) -> dict:
    """What produced a result: the package version, the git commit and dirty flag, and :func:`environment`."""
    return {"library_version": __version__, "git_commit": git_commit(), "git_dirty": git_dirty(),
            **environment(device)}
