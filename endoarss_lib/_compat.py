"""The package's old module paths, kept working after the modules moved into subpackages (issue 22, item 7).

``import endoarss_lib.engine``, ``from endoarss_lib.engine import fit``, ``mock.patch("endoarss_lib.engine.fit")``,
a pickle that names an old path and ``python -m endoarss_lib.sweep`` all reach the module at its new path: the
**same module object** (``endoarss_lib.engine is endoarss_lib.training.engine``), not a copy, so patching,
``isinstance`` and module state behave as before. The first use of an old path warns with a DeprecationWarning
naming the new one.

:data:`MOVED` is the table (old name -> new name, both relative to the package); :func:`install` puts the finder on
``sys.meta_path`` (the package's ``__init__`` calls it, and resolves ``endoarss_lib.engine`` as an attribute through
:func:`moved_attribute`). No file is left at an old path: the finder answers only for the names of the table.

``endoarss_lib.robustness`` is the one old path that is now a package (its subpackage ``robustness/``): the names of
the old module are found there with a warning that names :mod:`endoarss_lib.robustness.evaluation`.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

__all__ = ["MOVED", "install", "new_name", "moved_attribute"]

PACKAGE = __name__.rpartition(".")[0]

MOVED = {
    "engine": "training.engine",
    "losses": "training.losses",
    "distributed": "training.distributed",
    "diagnostics": "training.diagnostics",
    "tblog": "training.tblog",
    "runner": "training.runner",
    "inference": "evaluation.inference",
    "paper": "evaluation.paper",
    "corruptions": "robustness.corruptions",
    "corrupted_sets": "robustness.corrupted_sets",
    "robustness_report": "robustness.report",
    "experiment": "experiments.experiment",
    "sweep": "experiments.sweep",
    "results": "experiments.results",
    "viz": "experiments.viz",
    "bench": "experiments.bench",
    "pretrain": "foundation",
}

# Frames the warning must not point at: the import machinery and this package's own forwarding code.
_FORWARDING = (os.path.dirname(importlib.__file__), os.path.abspath(__file__),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py"))


def new_name(old: str) -> str | None:
    """The new full module name of an old full module name (``endoarss_lib.engine`` -> ``endoarss_lib.training.engine``;
    a submodule of a moved package follows it), or None when ``old`` did not move."""
    if not old.startswith(PACKAGE + "."):
        return None
    short = old[len(PACKAGE) + 1:]
    head, dot, tail = short.partition(".")
    if head not in MOVED:
        return None
    return f"{PACKAGE}.{MOVED[head]}{dot}{tail}"


def _message(old: str, new: str) -> str:
    return f"{old} moved to {new}: import it from there (the old path is an alias that will be removed)"


def _bootstrap(frame) -> bool:
    """A frame of importlib's bootstrap, which ``warnings`` itself skips when it counts ``stacklevel``."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def _warn(old: str, new: str) -> None:
    """DeprecationWarning attributed to the first frame outside the import machinery (the user's import line)."""
    level, frame = 1, sys._getframe(0)
    while True:
        frame = frame.f_back
        while frame is not None and _bootstrap(frame):
            frame = frame.f_back
        level += 1
        if frame is None or not frame.f_code.co_filename.startswith(_FORWARDING):
            break
    warnings.warn(_message(old, new), DeprecationWarning, stacklevel=level)


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module already at (or first imported from) its new name."""

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        _warn(self.old, self.new)
        return module

    def exec_module(self, module) -> None:
        # The import system has just set the alias's spec on the shared module: give it its own back.
        module.__spec__ = self._spec

    def get_code(self, fullname: str):
        """``python -m <old name>``: run the new module as ``__main__`` (runpy asks for this code)."""
        source = (f"import runpy, warnings\n"
                  f"warnings.warn({_message(self.old, self.new)!r}, DeprecationWarning)\n"
                  f"runpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n")
        return compile(source, f"<{fullname}>", "exec")


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` (and only those)."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        if real is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new), origin=real.origin)


def moved_attribute(name: str):
    """``endoarss_lib.<old module>`` as an attribute of the package (the import above, once, with its warning)."""
    if name in MOVED:
        return importlib.import_module(f"{PACKAGE}.{name}")
    raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
