"""A normal (non-editable) install works: the wheel is built, installed into an empty folder with
``pip install --no-deps --target`` and used from a working directory outside the repository.

The installed package must find its own paper tables and bundled weights, its console scripts must run, a smoke
training must work with the data home elsewhere, and nothing may be written into the installed package. The heavy
dependencies (torch, ...) come from the running interpreter's environment. Takes about 20 s on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import endoarss_lib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "endoarss_lib"
SCRIPTS = ("endoarss-train", "endoarss-sweep", "endoarss-prepare", "endoarss-evaluate", "endoarss-pretrain")


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
