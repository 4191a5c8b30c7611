"""The package's layout shows its architecture (issue 22, item 7), and this test keeps it so.

Every module's imports are read with ``ast`` (nothing is imported to find them):

* the package root holds at most :data:`ROOT_LIMIT` modules besides ``__init__``;
* :data:`LAYERS` says, as data, which part of the package may import which: a part (a subpackage, or a module at
  the root) imports only parts of lower layers and itself, so data flows one way;
* no import circle: none between modules through module-level imports (a module also runs the ``__init__`` of every
  package it imports from), none between parts through any import;
* every function-local import is listed in :data:`LOCAL_IMPORTS` with its kind and reason, and the kind is checked:
  ``cycle`` (the imported module imports this one, so a module-level import would be a circle), ``optional`` (a
  distribution outside ``[project.dependencies]``), ``heavy`` (slow to import, and importing every module of the
  package does not load it otherwise), ``standalone`` (the module must load on its own without it), ``platform``
  (a module some platforms lack; the code falls back);
* the old module paths (:data:`endoarss_lib._compat.MOVED`) give the same module objects as the new ones, with a
  DeprecationWarning naming the new path, and ``python -m <old path>`` still runs the command.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "endoarss_lib"
ROOT_LIMIT = 10

# Lowest first. A part may import parts of lower layers (and itself), never one of its own layer or above.
LAYERS: list[dict[str, str]] = [
    {"_compat": "the old module paths (imports nothing of the package)",
     "version": "package version and provenance", "coerce": "typed values and YAML", "atomic": "atomic writes, locks"},
    {"cli": "what every command line shares (exit codes, --version, --debug)"},
    {"data": "datasets: registry, synthetic generator, files, loader, cache, preparation"},
    {"metrics": "meters and formulas (confusion matrices, boundary distances, Delta_m)"},
    {"tasks": "the task registry: each task's loss, meter, head, metrics, prior",
     "evidence": "outcome statistics, scales, variants and claims (numbers only: no model, no training)"},
    {"models": "backbones, adapters, SMA, heads, architectures, released model, weights",
     "weighting": "multi-task weighting methods"},
    {"config": "the typed run config (checked against data, tasks, models and weighting methods)"},
    {"training": "the engine, the result-row schema, losses, data parallelism, diagnostics, the runner"},
    {"evaluation": "finished runs evaluated; the paper's tables"},
    {"robustness": "corruptions, corrupted test sets, their evaluation and report"},
    {"experiments": "what notebooks use: Experiment, sweeps, result tables, figures, cost benchmarks",
     "foundation": "self-supervised pretraining of the bundled backbone"},
    {"train": "command line: python -m endoarss_lib.train", "evaluate": "command line: a run folder or the released checkpoint"},
    {"endoarss_lib": "the package's public API (__init__)"},
]

# Every function-local import: (module, imported module) -> (kind, reason). A new one needs a line here.
LOCAL_IMPORTS: dict[tuple[str, str], tuple[str, str]] = {
    ("endoarss_lib.tasks", "endoarss_lib.models.heads"):
        ("cycle", "the model builder and architectures import the task registry, whose head factories build heads"),
    ("endoarss_lib.metrics", "endoarss_lib.tasks"):
        ("cycle", "the task registry builds on the meters; delta_m parses result keys with tasks.split_key"),
    ("endoarss_lib.models.pretrained", "endoarss_lib.models.backbones"):
        ("cycle", "the backbone registry loads bundled weights; a weight file without a record takes the "
                  "backbone's normalisation"),
    ("endoarss_lib.version", "torch"):
        ("standalone", "version.py loads alone (the build reads the version from it, without torch)"),
    ("endoarss_lib.data.cache", "fcntl"):
        ("platform", "POSIX file locks; elsewhere two builders may race harmlessly"),
    ("endoarss_lib.models.weights", "huggingface_hub"):
        ("optional", "huggingface_hub: timm's hub client, not a dependency of this package; hub_mode works without"),
    ("endoarss_lib.experiments.sweep", "papermill"):
        ("optional", "papermill: the 'notebooks' extra, only to execute a grid's notebooks"),
    ("endoarss_lib.experiments.sweep", "submitit"):
        ("optional", "submitit: the 'cluster' extra, only for --executor slurm / submitit-local"),
    ("endoarss_lib.experiments.sweep", "submitit.helpers"):
        ("optional", "submitit: the 'cluster' extra, only for --executor slurm / submitit-local"),
    ("endoarss_lib.evaluation.export", "onnxruntime"):
        ("optional", "onnxruntime: the 'export' extra, only to check an exported ONNX file against the model"),
    ("endoarss_lib.training.tblog", "torch.utils.tensorboard"):
        ("optional", "tensorboard: the 'tensorboard' extra, only with TrainConfig.tensorboard"),
    ("endoarss_lib.experiments.viz", "seaborn"):
        ("heavy", "about 1.4 s; one plot (plot_distributions) uses it"),
    ("endoarss_lib.foundation.probes", "sklearn.linear_model"):
        ("heavy", "scikit-learn, about 1 s; only the linear probes of a pretrained backbone use it"),
    ("endoarss_lib.foundation.probes", "sklearn.preprocessing"):
        ("heavy", "scikit-learn, about 1 s; only the linear probes of a pretrained backbone use it"),
    ("endoarss_lib.robustness.corruptions", "imagecorruptions"):
        ("heavy", "about 0.4 s; only the fifteen corruptions of the package call it"),
}
KINDS = {"cycle", "optional", "heavy", "standalone", "platform"}
# distribution of each optional import (checked against [project.dependencies])
OPTIONAL_DISTRIBUTIONS = {"huggingface_hub": "huggingface-hub", "papermill": "papermill", "submitit": "submitit",
                          "torch.utils.tensorboard": "tensorboard", "onnxruntime": "onnxruntime"}


# ---------------------------------------------------------------------------------------------------- reading

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {m for m, p in FILES.items() if p.name == "__init__.py"}


class Import:
    """One import statement's edge: ``module`` imports ``target`` (a module) at ``line``; ``local`` inside a function."""

    def __init__(self, module: str, target: str, line: int, local: bool, node: ast.AST):
        self.module, self.target, self.line, self.local, self.node = module, target, line, local, node

    def __repr__(self):
        return f"{self.module}:{self.line} -> {self.target}{' (local)' if self.local else ''}"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[Import]:
    tree = ast.parse(FILES[module].read_text(), filename=str(FILES[module]))
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, node.lineno, id(node) in local, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for a in node.names:  # `from package import submodule` imports the submodule
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in FILES else base
                out.append(Import(module, target, node.lineno, id(node) in local, node))
    return out


IMPORTS = {m: _imports(m) for m in FILES}


def _internal(target: str) -> bool:
    return target == "endoarss_lib" or target.startswith("endoarss_lib.")


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


LAYER_OF = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _module_edges(module: str, imports) -> set[str]:
    """What importing ``module`` runs through ``imports``: each target and the ``__init__`` of the packages above it
    (the package root aside, which runs first; and this module's own packages, which are running already)."""
    out = set()
    for imp in imports:
        if _internal(imp.target):
            out.add(imp.target)
            out.update(a for a in _ancestors(imp.target) if a != "endoarss_lib" and a not in _ancestors(module))
    out.discard(module)
    return out


MODULE_GRAPH = {m: _module_edges(m, [i for i in IMPORTS[m] if not i.local]) for m in FILES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _reaches(graph: dict[str, set[str]], start: set[str], goal: str) -> bool:
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def _local_key(imp: Import) -> tuple[str, str]:
    if _internal(imp.target):
        return imp.module, imp.target
    node = imp.node  # a third-party import is named as written
    return imp.module, node.module if isinstance(node, ast.ImportFrom) else imp.target


LOCALS = [imp for imports in IMPORTS.values() for imp in imports if imp.local]


def _cycle_breaking(imp: Import) -> bool:
    return imp.local and LOCAL_IMPORTS.get(_local_key(imp), ("",))[0] == "cycle"


# ---------------------------------------------------------------------------------------------------- the rules

def test_at_most_about_ten_modules_at_the_package_root():
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root) <= ROOT_LIMIT, f"{len(root)} modules at the package root: {root}; put new ones in a subpackage"


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in FILES}
    assert parts <= set(LAYER_OF), f"not placed in LAYERS: {sorted(parts - set(LAYER_OF))}"
    assert not set(LAYER_OF) - parts, f"LAYERS names parts that do not exist: {sorted(set(LAYER_OF) - parts)}"


def test_no_upward_import():
    """A part imports only parts of lower layers (and itself); the cycle-breaking local imports are the exceptions,
    each listed in LOCAL_IMPORTS."""
    bad = []
    for imports in IMPORTS.values():
        for imp in imports:
            if not _internal(imp.target) or _cycle_breaking(imp):
                continue
            here, there = _part(imp.module), _part(imp.target)
            if here != there and LAYER_OF[there] >= LAYER_OF[here]:
                bad.append(f"{imp}: {here} (layer {LAYER_OF[here]}) may not import {there} (layer {LAYER_OF[there]})")
    assert not bad, "\n".join(bad)


def test_no_import_circle_between_modules():
    cycle = _find_cycle(MODULE_GRAPH)
    assert cycle is None, "module-level import circle: " + " -> ".join(cycle)


def test_no_import_circle_between_parts():
    graph: dict[str, set[str]] = {}
    for imports in IMPORTS.values():
        for imp in imports:
            if _internal(imp.target) and not _cycle_breaking(imp) and _part(imp.module) != _part(imp.target):
                graph.setdefault(_part(imp.module), set()).add(_part(imp.target))
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle between parts of the package: " + " -> ".join(cycle)


def test_every_function_local_import_is_listed_with_its_reason():
    found = {_local_key(imp) for imp in LOCALS}
    unlisted = sorted(f"{imp}" for imp in LOCALS if _local_key(imp) not in LOCAL_IMPORTS)
    assert not unlisted, ("function-local imports without a reason: import at the top of the module, or add them to "
                          "LOCAL_IMPORTS if they break a cycle or defer an optional, heavy or platform module:\n"
                          + "\n".join(unlisted))
    stale = sorted(set(LOCAL_IMPORTS) - found)
    assert not stale, f"LOCAL_IMPORTS lists imports that are gone: {stale}"
    assert {kind for kind, _ in LOCAL_IMPORTS.values()} <= KINDS
    assert all(len(reason) > 20 for _, reason in LOCAL_IMPORTS.values())


def test_cycle_breaking_local_imports_do_break_a_cycle():
    """The imported module (or a package ``__init__`` it runs) imports this module at module level: lifting the
    import to the top would close a circle."""
    for (module, target), (kind, _) in LOCAL_IMPORTS.items():
        if kind == "cycle":
            start = {target} | {a for a in _ancestors(target) if a != "endoarss_lib" and a not in _ancestors(module)}
            assert _reaches(MODULE_GRAPH, start, module), f"{module} -> {target}: no cycle to break; import at the top"


def test_optional_local_imports_are_not_dependencies():
    declared = {d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].split("~")[0]
                .strip().lower().replace("_", "-")
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for (module, target), (kind, _) in LOCAL_IMPORTS.items():
        if kind == "optional":
            top = next(k for k in OPTIONAL_DISTRIBUTIONS if target == k or target.startswith(k + "."))
            assert OPTIONAL_DISTRIBUTIONS[top] not in declared, f"{target} is a dependency: import it at the top"


def test_platform_local_imports_fall_back():
    for imp in LOCALS:
        if LOCAL_IMPORTS.get(_local_key(imp), ("",))[0] == "platform":
            source = FILES[imp.module].read_text().splitlines()
            assert "except ImportError" in "\n".join(source[imp.line:imp.line + 3]), imp


_HEAVY_PROBE = r"""
import importlib, json, pkgutil, sys
import endoarss_lib
for m in pkgutil.walk_packages(endoarss_lib.__path__, "endoarss_lib."):
    importlib.import_module(m.name)
print(json.dumps(sorted(name for name in sys.argv[1:] if name in sys.modules)))
"""

_STANDALONE_PROBE = r"""
import importlib.util, sys
for name in sys.argv[2:]:
    sys.modules[name] = None  # `import name` now fails
spec = importlib.util.spec_from_file_location("version_alone", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.__version__)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_heavy_local_imports_stay_unimported():
    """Importing every module of the package leaves the deferred heavy modules unloaded (else deferring is moot)."""
    heavy = sorted({target for (_, target), (kind, _) in LOCAL_IMPORTS.items() if kind == "heavy"})
    done = subprocess.run([sys.executable, "-c", _HEAVY_PROBE, *heavy], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_standalone_local_imports_are_not_needed_to_load_the_module():
    for (module, target), (kind, _) in LOCAL_IMPORTS.items():
        if kind == "standalone":
            done = subprocess.run([sys.executable, "-c", _STANDALONE_PROBE, str(FILES[module]), target], cwd=ROOT,
                                  env=_env(), capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------- old paths

_OLD_PATHS_PROBE = r"""
import importlib, json, sys, warnings
warnings.simplefilter("always")
import endoarss_lib
from endoarss_lib._compat import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"endoarss_lib.{old}")
    target = importlib.import_module(f"endoarss_lib.{new}")
    messages = [(str(w.message), w.filename) for w in caught if issubclass(w.category, DeprecationWarning)]
    out[old] = {"same": module is target, "attribute": getattr(endoarss_lib, old) is target,
                "spec": module.__spec__.name, "warned": [m for m, f in messages if f"endoarss_lib.{new}" in m],
                "where": sorted({f for m, f in messages})}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from endoarss_lib.robustness import evaluate_corruptions
from endoarss_lib.robustness.evaluation import evaluate_corruptions as moved
out["robustness.evaluate_corruptions"] = {"same": evaluate_corruptions is moved,
                                          "warned": [str(w.message) for w in caught]}
print(json.dumps(out))
"""


def test_old_module_paths_are_the_same_modules_and_warn(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(_OLD_PATHS_PROBE)
    done = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    from endoarss_lib._compat import MOVED

    for old, new in MOVED.items():
        r = result[old]
        assert r["same"] and r["attribute"], (old, r)
        assert r["spec"] == f"endoarss_lib.{new}", (old, r)  # the module keeps its own spec
        assert len(r["warned"]) == 1 and r["where"] == [str(probe)], (old, r)  # one warning, at the import line
    r = result["robustness.evaluate_corruptions"]
    assert r["same"] and len(r["warned"]) == 1 and "endoarss_lib.robustness.evaluation" in r["warned"][0], r


def test_the_library_imports_only_modules_that_exist():
    missing = sorted(f"{imp}" for imports in IMPORTS.values() for imp in imports
                     if _internal(imp.target) and imp.target != "endoarss_lib" and imp.target not in FILES)
    assert not missing, f"imports of modules that do not exist (an old path?): {missing}"


def _old_paths_in(source: str, name: str) -> list[str]:
    """Imports of old module paths (and strings naming them, e.g. patch targets) in a file outside the package."""
    from endoarss_lib._compat import MOVED, new_name

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a file's own invalid escape sequences are not this test's business
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if new_name(node.module) or (node.module == "endoarss_lib" and {a.name for a in node.names} & set(MOVED)):
                found.append(f"{name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno}: import {a.name}" for a in node.names if new_name(a.name)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{name}:{node.lineno}: {word!r}" for word in node.value.replace('"', " ").split()
                      if word.startswith("endoarss_lib.") and new_name(word.rstrip(".,:;()'"))]
    return found


def test_tests_benchmarks_scripts_and_notebooks_use_the_new_paths():
    import nbformat

    found = []
    for folder in ("tests", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name != Path(__file__).name:  # this file names the old paths on purpose
                found += _old_paths_in(path.read_text(), path.relative_to(ROOT).as_posix())
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                source = "\n".join(("#" + line) if line.lstrip().startswith(("%", "!")) else line
                                   for line in cell.source.split("\n"))
                found += _old_paths_in(source, f"{path.name} cell {i}")
    assert not found, "old module paths (see endoarss_lib._compat.MOVED for the new ones):\n" + "\n".join(found)


def test_old_module_paths_cover_every_moved_module():
    """Every module that left the package root has an entry in MOVED (and MOVED points at existing modules)."""
    from endoarss_lib._compat import MOVED

    before = {"engine", "losses", "distributed", "diagnostics", "tblog", "runner", "inference", "paper", "corruptions",
              "corrupted_sets", "robustness_report", "experiment", "sweep", "results", "viz", "bench", "pretrain"}
    assert set(MOVED) == before
    assert all(f"endoarss_lib.{new}" in FILES for new in MOVED.values())
    assert not {p.stem for p in PACKAGE.glob("*.py")} & set(MOVED)  # no file left at an old path


_DASH_M_PROBE = r"""
import contextlib, io, json, runpy, sys, warnings
codes = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # what `python -m module` does
            codes[module] = [None, out.getvalue()[:60]]
        except SystemExit as exc:
            codes[module] = [exc.code, out.getvalue()[:60]]
print(json.dumps(codes))
"""


def test_python_dash_m_old_command_paths_still_run(tmp_path):
    old = {"endoarss_lib.sweep": "endoarss_lib.experiments.sweep", "endoarss_lib.pretrain": "endoarss_lib.foundation"}
    done = subprocess.run([sys.executable, "-c", _DASH_M_PROBE, *old], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    for module, new in old.items():
        code, usage = codes[module]
        assert code == 0 and usage.startswith(f"usage: python -m {new}"), (module, codes[module])


@pytest.mark.parametrize("name", ["make_synthetic", "MTLDataset", "build_model", "fit", "preset", "TrainConfig",
                                  "get_weighting", "classification_metrics", "segmentation_metrics",
                                  "list_pretrained", "get_pretrained", "__version__"])
def test_public_api_is_unchanged(name):
    import endoarss_lib

    assert name in endoarss_lib.__all__ and getattr(endoarss_lib, name) is not None
