"""A normal (non-editable) install works: the wheel is built, installed into an empty folder with
``pip install --no-deps --target`` and used from a working directory outside the repository.

The installed package must find its own paper tables and bundled weights, its console scripts must run, a smoke
training must work with the data home elsewhere, and nothing may be written into the installed package. The heavy
dependencies (torch, ...) come from the running interpreter's environment. Takes about 20 s on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import endoarss_lib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "endoarss_lib"
SCRIPTS = tuple(tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
                ["scripts"])  # every console script the package declares


def _pip(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PIP_NO_INPUT": "1", "PIP_NO_INDEX": "1"})


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (bytecode caches excluded: the interpreter's business)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder, wheel path): the wheel built from a copy of the sources (so the checkout gets no build/ or
    egg-info) without build isolation (offline: the running environment's setuptools), installed with --target."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "endoarss_lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        import setuptools
    except ImportError:
        setuptools = None
    from packaging.version import Version

    if setuptools is None or Version(setuptools.__version__) < Version("77"):
        # pyproject.toml's build-system (SPDX licence, license-files) needs setuptools >= 77; without build isolation
        # (no index here) the environment's own setuptools builds the wheel
        pytest.skip(f"building the wheel offline needs setuptools>=77 in this environment (found "
                    f"{getattr(setuptools, '__version__', 'none')}): pip install 'setuptools>=77'")
    built = _pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(root / "dist"), str(src), cwd=root)
    output = built.stderr + built.stdout
    if built.returncode != 0 and ("No module named 'setuptools" in output or "No module named 'wheel'" in output):
        pytest.skip(f"cannot build a wheel offline here (the build backend is missing): {output.strip()[-300:]}")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("endoarss-*.whl")
    target = root / "target"
    done = _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return target, wheel


def _run(code_or_args, target: Path, cwd: Path, extra_env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           **(extra_env or {})}
    env.pop("ENDOARSS_PAPER_DIR", None)
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_wheel_holds_the_package_data_and_metadata(installed):
    import zipfile

    target, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    tables = {f"endoarss_lib/evaluation/paper_tables/{n}" for n in ("README.md", "table2_mtlesd.csv",
                                                                   "table7_robustness.csv")}
    assert tables <= names
    bundled = {f"endoarss_lib/weights/{p.name}" for p in (PACKAGE / "weights").glob("*")
               if p.suffix in (".safetensors", ".json")}
    assert bundled and bundled <= names
    assert not [n for n in names if n.startswith(("tests/", "notebooks/", "results/", "docs/"))]
    dist_info = f"endoarss-{endoarss_lib.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert all(f"{script} = " in entry_points for script in SCRIPTS)


def test_installed_package_reads_its_own_tables_and_weights(installed, tmp_path):
    target, _ = installed
    probe = _run("""
import json, endoarss_lib
from endoarss_lib.evaluation.paper import load_paper_table, paper_dir
from endoarss_lib.models.pretrained import verified_file
names = endoarss_lib.list_pretrained()
print(json.dumps({"file": endoarss_lib.__file__, "version": endoarss_lib.__version__, "paper_dir": str(paper_dir()),
                  "table2_rows": len(load_paper_table("table2")), "pretrained": names,
                  "weights": [str(verified_file(n).file) for n in names]}))
""", target, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    resolved = target.resolve()
    assert Path(info["file"]).resolve().is_relative_to(resolved)  # the installed copy, not the checkout
    assert info["version"] == endoarss_lib.__version__
    assert Path(info["paper_dir"]).resolve() == resolved / "endoarss_lib" / "evaluation" / "paper_tables"
    assert info["table2_rows"] == 29
    assert "synthdino_vit_mini14" in info["pretrained"]
    for path in info["weights"]:  # present in the target and matching their recorded sha256 (verified_file)
        assert Path(path).resolve().is_relative_to(resolved) and Path(path).is_file()


def test_installed_scripts_answer_help(installed, tmp_path):
    target, _ = installed
    bin_dir = target / "bin"
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(SCRIPTS)
    # one interpreter runs every installed script file as its own __main__ (as its shebang line would)
    probe = _run(f"""
import contextlib, io, json, runpy, sys
codes = {{}}
for script in {list(SCRIPTS)!r}:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path({str(bin_dir)!r} + "/" + script, run_name="__main__")
            codes[script] = None
        except SystemExit as exc:
            codes[script] = [exc.code, out.getvalue()[:6]]
print(json.dumps(codes))
""", target, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {s: [0, "usage:"] for s in SCRIPTS}


def test_installed_smoke_training_writes_nothing_into_the_package(installed, tmp_path):
    target, _ = installed
    before = _tree(target)
    work, data, runs = tmp_path / "work", tmp_path / "data", tmp_path / "runs"
    work.mkdir()
    done = _run(["-m", "endoarss_lib.train", "--preset", "smoke", "epochs=1", "image_size=56",
                 "synthetic_n_train=12", "synthetic_n_test=6", f"out_dir={runs}", "progress=false",
                 "model.backbone=vit_tiny_patch14"], target, cwd=work, extra_env={"ENDOARSS_DATA": str(data)})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = runs.glob("*/result.json")
    row = json.loads(result.read_text())
    assert row["data"] == "synthetic" and row["library_version"] == endoarss_lib.__version__
    assert row["git_commit"] == "unknown"  # an installed package is no checkout
    assert any(data.iterdir())  # the synthetic data went to ENDOARSS_DATA ...
    assert _tree(target) == before  # ... and nothing into the installed package
    assert not list(work.iterdir())  # nor into the working directory


# ------------------------------------------------------------------------------------------- install routes
# make install TORCH=..., requirements-lock.txt, pyproject's ranges. None of these downloads anything.
import importlib.util  # noqa: E402
import re  # noqa: E402
import tomllib  # noqa: E402

from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = REPO / "requirements-lock.txt"
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")


def _pins() -> dict[str, str]:
    """constraints.txt's name==version lines, read here independently of the Makefile."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _lock_module():
    spec = importlib.util.spec_from_file_location("endoarss_lock_script", REPO / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """The Makefile's inputs in a folder, with a .venv whose python only logs the commands it is given."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml", "constraints.txt", "requirements-lock.txt"):
        shutil.copy2(REPO / name, root / name)
    log = root / "commands.log"
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "python $*" >> {log}\n')
    python.chmod(0o755)
    return root, log


def _make(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH", "LOCK", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run([MAKE, "-C", str(root), *args], capture_output=True, text=True, timeout=60, env=env)


@needs_make
@pytest.mark.parametrize("build", ["cpu", "cu126", "cu130"])
def test_make_install_dry_run_takes_torch_from_the_pytorch_index(build, tmp_path):
    pins = _pins()
    done = _make(REPO, "-n", "install", f"TORCH={build}", f"VENV={tmp_path / 'venv'}")
    assert done.returncode == 0, done.stderr
    torch_line = (f"install -q --index-url https://download.pytorch.org/whl/{build} "
                  f"torch=={pins['torch']} torchvision=={pins['torchvision']}")
    assert torch_line in done.stdout, done.stdout
    lines = done.stdout.splitlines()
    project = [i for i, line in enumerate(lines) if '-e ".[notebooks,test]"' in line]
    assert project and project[0] > next(i for i, line in enumerate(lines) if torch_line in line)  # torch first
    assert "-c constraints.txt -c requirements-lock.txt" in lines[project[0]]


@needs_make
def test_make_install_default_and_bad_torch_builds(tmp_path):
    done = _make(REPO, "-n", "install", f"VENV={tmp_path / 'venv'}")
    assert done.returncode == 0 and "download.pytorch.org" not in done.stdout  # PyPI's torch, as before
    assert '-c constraints.txt -c requirements-lock.txt -e ".[notebooks,test]"' in done.stdout
    done = _make(REPO, "-n", "install", "TORCH=cu118", f"VENV={tmp_path / 'venv'}")
    assert done.returncode != 0 and "TORCH=cu118: expected one of default cpu cu126 cu130" in done.stderr


@needs_make
def test_make_remembers_the_torch_build_and_reinstalls_torch_only_when_it_changes(tmp_path):
    root, log = _fake_checkout(tmp_path)

    def install(*args: str) -> list[str]:
        log.write_text("")
        done = _make(root, "install", *args)
        assert done.returncode == 0, done.stderr
        return [line for line in log.read_text().splitlines() if line]

    first = install()
    assert len(first) == 1 and "download.pytorch.org" not in first[0] and "uninstall" not in first[0]
    assert install() == []  # up to date
    cpu = install("TORCH=cpu")
    assert [("uninstall" in c, "whl/cpu" in c) for c in cpu] == [(True, False), (False, True), (False, False)]
    assert install() == []  # later targets keep the cpu build (remembered in .venv)
    assert (root / ".venv" / ".endoarss-torch").read_text().strip() == "cpu"
    back = install("TORCH=default")
    assert len(back) == 2 and "uninstall" in back[0] and "download.pytorch.org" not in back[1]
    # a .venv installed before the build was recorded had PyPI's torch: no reinstall
    (root / ".venv" / ".endoarss-torch").unlink()
    assert install() == []


def test_lock_checker_names_every_difference():
    lock = _lock_module()
    locked = {"numpy": "2.0.0", "pandas": "2.2.0", "nvidia-cublas": "13.1.0", "triton": "3.0.0"}
    have = {"numpy": "2.0.0", "pandas": "2.3.0"}
    assert lock.mismatches(locked, have, cuda_build=False) == ["pandas: locked 2.2.0, installed 2.3.0"]
    assert lock.mismatches(locked, have, cuda_build=True) == [
        "nvidia-cublas: locked 13.1.0, not installed", "pandas: locked 2.2.0, installed 2.3.0",
        "triton: locked 3.0.0, not installed"]
    assert lock.normalise("Jupyter_Server.Terminals") == "jupyter-server-terminals"
    assert lock.public("2.14.1+cu130") == "2.14.1"


def test_the_running_environment_matches_the_lock_file():
    lock = _lock_module()
    locked = lock.read_lock(LOCK)
    header = LOCK.read_text().splitlines()
    environment = next(line for line in header if line.startswith("# Environment:"))
    import torch

    cuda_build = f"(CUDA {torch.version.cuda or 'none'})" in environment
    problems = lock.mismatches(locked, lock.installed(), cuda_build=cuda_build)
    assert not problems, ("the environment differs from requirements-lock.txt (make install reinstalls from it; after "
                          "a deliberate upgrade run make lock): " + "; ".join(problems))
    pins = _pins()
    for name, version in pins.items():  # the lock agrees with the pins the install uses
        assert locked[lock.normalise(name)] == version, name
    here = f"Python {sys.version_info.major}.{sys.version_info.minor}."
    if here in environment and sys.platform == "linux":  # the tested platform: the lock covers what the install pulls
        missing = sorted(set(lock.closure()) - set(locked))
        assert not missing, f"requirements-lock.txt lacks {missing}: pyproject.toml changed; run make lock"


def test_pyproject_keeps_a_users_torch():
    """Ranges only: torch and torchvision lower-bounded, never capped or pinned, and every installed version of the
    heavy packages inside the declared ranges (so pip keeps them)."""
    from importlib.metadata import version

    deps = {Requirement(d).name.lower(): Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        operators = {spec.operator for spec in deps[name].specifier}
        assert operators == {">="}, (name, str(deps[name].specifier))  # no <, <=, ==, ~=, != : any newer build fits
    for name in ("torch", "torchvision", "timm"):
        installed = Version(version(name)).public
        assert deps[name].specifier.contains(installed, prereleases=True), (name, installed, str(deps[name]))
        assert deps[name].specifier.contains(_pins()[name]), name  # and the pins the install uses


def test_requires_python_admits_the_tested_python_and_no_older():
    from packaging.specifiers import SpecifierSet

    declared = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert declared.contains(".".join(map(str, sys.version_info[:3])))  # the running interpreter
    assert declared.contains("3.11.0") and not declared.contains("3.10.12")  # 3.11: the tested one (docs/install.md)
    assert not [s for s in declared if s.operator in ("<", "<=", "==", "~=")]  # no cap (docs/install.md)


def test_supported_pythons_are_the_classifiers_and_the_running_one_is_among_them():
    """The supported versions are the classifiers' (docs/install.md): the oldest is requires-python's floor, and the
    interpreter running the suite (CI's) is one of them, so CI tests the oldest and newest declared while only one is
    declared, and fails the day CI moves to an undeclared one."""
    from packaging.specifiers import SpecifierSet

    declared = sorted(tuple(map(int, c.rsplit("::", 1)[1].strip().split(".")))
                      for c in PYPROJECT["project"]["classifiers"]
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert declared, "no Python version classifiers"
    floor = SpecifierSet(PYPROJECT["project"]["requires-python"])
    oldest = ".".join(map(str, declared[0]))
    assert floor.contains(f"{oldest}.0") and not floor.contains(f"{declared[0][0]}.{declared[0][1] - 1}.99")
    assert sys.version_info[:2] in declared, (sys.version_info[:2], declared)
    # CI runs one interpreter: declaring a second version needs a second CI run first (docs/install.md)
    assert len(declared) == 1, f"declared {declared}, but CI tests {sys.version_info[:2]} only"


def test_installing_the_package_keeps_the_installed_torch(tmp_path):
    """pip's own answer, offline: installing the project into this environment would install the project only
    (torch, torchvision and every other dependency already satisfy its ranges)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "endoarss_lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    report = tmp_path / "report.json"
    done = _pip("install", "--dry-run", "--no-build-isolation", "--report", str(report), str(src), cwd=tmp_path)
    if done.returncode != 0 and "setuptools" in done.stderr + done.stdout:
        pytest.skip(f"cannot build the metadata offline here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    would = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert would == {"endoarss"}, would
