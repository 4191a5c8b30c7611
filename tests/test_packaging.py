"""What the project declares about itself: dependency ranges vs the tested constraints, console scripts, licence and
citation metadata, the package's own paper tables, and that importing it leaves the model hub alone."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import endoarss_lib
from endoarss_lib.evaluation import paper
from endoarss_lib.models.weights import hub_mode

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def _requirement(spec: str) -> tuple[str, str]:
    name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0)
    return name.lower(), spec[len(name):].split(";")[0].strip()


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, spec = _requirement(line)
            pins[name] = spec
    return pins


# -------------------------------------------------------------------------------------------- dependencies

def test_pyproject_declares_ranges_and_constraints_pin_the_tested_versions():
    deps = dict(_requirement(d) for d in PYPROJECT["project"]["dependencies"])
    # the library never forces one torch: ranges only, no exact pins
    assert not [d for d, spec in deps.items() if "==" in spec], deps
    assert deps["torch"].startswith(">=") and deps["torchvision"].startswith(">=")
    pins = _constraints()
    # the tested versions are exact, and torch / torchvision travel together
    assert pins["torch"] == "==2.14.1" and pins["torchvision"] == "==0.29.1"
    assert all(spec.startswith("==") for spec in pins.values()), pins
    # every pin satisfies the declared range (a pin outside it would make pip fail to resolve)
    from packaging.specifiers import SpecifierSet

    for name, spec in pins.items():
        assert name in deps, f"constraints.txt pins {name}, which pyproject.toml does not depend on"
        assert SpecifierSet(deps[name]).contains(spec[2:]), (name, deps[name], spec)


def test_make_and_conda_install_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    stamp_rule = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M).group(1).split()
    assert {"pyproject.toml", "constraints.txt"} <= set(stamp_rule)  # a changed pin reinstalls
    assert re.search(r"pip install .*-c constraints\.txt .*-e \"\.\[notebooks,test\]\"", makefile)
    pip_lines = next(d["pip"] for d in yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
                     if isinstance(d, dict))
    assert "-c constraints.txt" in pip_lines
    # no second, diverging set of pins in environment.yml
    assert not [line for line in pip_lines if "==" in line], pip_lines


def test_version_is_declared_once():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "endoarss_lib.version.__version__"


# -------------------------------------------------------------------------------------------- console scripts

def test_console_scripts_are_the_documented_seven():
    assert SCRIPTS == {"endoarss-train": "endoarss_lib.train:main",
                       "endoarss-sweep": "endoarss_lib.experiments.sweep:main",
                       "endoarss-prepare": "endoarss_lib.data.prepare:main",
                       "endoarss-evaluate": "endoarss_lib.evaluate:main",
                       "endoarss-pretrain": "endoarss_lib.foundation:main",
                       "endoarss-predict": "endoarss_lib.evaluation.predict:main",
                       "endoarss-export": "endoarss_lib.evaluation.export:main"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_entry_point_answers_help(script, capsys):
    module, func = SCRIPTS[script].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


_DASH_M_PROBE = r"""
import contextlib, io, json, runpy, sys
codes = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # exactly what `python -m module` does
            codes[module] = (None, out.getvalue()[:6])
        except SystemExit as exc:
            codes[module] = (exc.code, out.getvalue()[:6])
print(json.dumps(codes))
"""


def test_python_dash_m_help_exits_zero_for_every_command(tmp_path):
    modules = sorted({target.split(":")[0] for target in SCRIPTS.values()})
    done = subprocess.run([sys.executable, "-c", _DASH_M_PROBE, *modules], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == {m: [0, "usage:"] for m in modules}


# -------------------------------------------------------------------------------------------- licence, citation

def test_licence_is_mit_and_matches_pyproject():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the endoarss authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_citation_file_is_complete_and_matches_the_package():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "version", "license", "references", "type"):
        assert key in cff, key
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["title"] == "endoarss" and cff["license"] == "MIT"
    assert str(cff["version"]) == endoarss_lib.__version__
    assert "repository-code" not in cff or not re.search(r"example|placeholder|TODO", cff["repository-code"])
    titles = [" ".join(r["title"].split()) for r in cff["references"]]
    assert titles[0].startswith("EndoARSS: Adapting Spatially-Aware Foundation Model")
    assert [t.split(":")[0] for t in titles] == ["EndoARSS", "MEJO", "Unified Multi-modal Diagnostic Framework with "
                                                 "Reconstruction Pre-training and Heterogeneity-combat Tuning",
                                                 "Uni-Med"]
    for ref in cff["references"]:
        assert ref["type"] in ("article", "conference-paper") and ref["authors"] and isinstance(ref["year"], int)
        for person in ref["authors"]:
            assert person.get("family-names") and person.get("given-names"), person
    assert [a["family-names"] for a in cff["references"][0]["authors"]][:1] == ["Wang"]


# -------------------------------------------------------------------------------------------- package data

def test_paper_tables_come_from_the_package_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("ENDOARSS_PAPER_DIR", raising=False)
    package = Path(endoarss_lib.__file__).resolve().parent
    assert paper.paper_dir() == package / "evaluation" / "paper_tables"
    assert {p.name for p in paper.paper_dir().glob("*.csv")} == set(paper._FILES.values())
    assert (paper.paper_dir() / "README.md").is_file()
    # an override is read instead of the package's copy
    (tmp_path / "table2_mtlesd.csv").write_text(
        (package / "evaluation" / "paper_tables" / "table2_mtlesd.csv").read_text().splitlines()[0] + "\n")
    monkeypatch.setenv("ENDOARSS_PAPER_DIR", str(tmp_path))
    assert paper.paper_dir() == tmp_path and len(paper.load_paper_table("table2")) == 0
    with pytest.raises(FileNotFoundError, match="ENDOARSS_PAPER_DIR is set"):
        paper.load_paper_table("table3")


# -------------------------------------------------------------------------------------------- the model hub

_HUB_PROBE = r"""
import importlib, json, os, pkgutil
import torch, torchvision, timm, cv2, huggingface_hub.constants as c  # third-party imports set their own variables
before, offline_before = dict(os.environ), c.HF_HUB_OFFLINE
import endoarss_lib
for m in pkgutil.walk_packages(endoarss_lib.__path__, "endoarss_lib."):
    importlib.import_module(m.name)
after = dict(os.environ)
print(json.dumps({"changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
                  "hf_offline_env": os.environ.get("HF_HUB_OFFLINE"),
                  "constant_before": offline_before, "constant_after": c.HF_HUB_OFFLINE}))
"""


def test_importing_the_package_leaves_the_model_hub_alone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ENDOARSS_ALLOW_HUB")}
    done = subprocess.run([sys.executable, "-c", _HUB_PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["hf_offline_env"] is None  # not added by importing endoarss_lib or any of its modules
    assert probe["constant_before"] is False and probe["constant_after"] is False
    assert probe["changed"] == []  # the package sets no environment variable at all


def test_only_the_projects_own_hub_call_goes_offline(monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ENDOARSS_ALLOW_HUB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with hub_mode():
        assert constants.HF_HUB_OFFLINE is False  # online by default, as in timm / Hugging Face
    assert constants.HF_HUB_OFFLINE is True  # restored: the rest of the process keeps its own setting
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        with hub_mode():
            assert constants.HF_HUB_OFFLINE is True, name  # offline (fails fast) when the user says so
        assert constants.HF_HUB_OFFLINE is False
        monkeypatch.delenv(name)
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("value,offline", [("0", True), ("1", False)])
def test_endoarss_allow_hub_is_a_deprecated_alias(monkeypatch, value, offline):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENDOARSS_ALLOW_HUB", value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not offline)
    with pytest.warns(FutureWarning, match="HF_HUB_OFFLINE=1"):
        with hub_mode():
            assert constants.HF_HUB_OFFLINE is offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the standard variable wins, without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hub_mode():
            assert constants.HF_HUB_OFFLINE is True


def test_generated_data_default_to_a_per_user_cache_never_the_package(tmp_path, monkeypatch):
    from endoarss_lib.config import data_home

    package = Path(endoarss_lib.__file__).resolve().parent
    monkeypatch.delenv("ENDOARSS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_home() == tmp_path / "cache" / "endoarss" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_home() == Path.home() / ".cache" / "endoarss" / "data"
    assert not data_home().resolve().is_relative_to(package)
    monkeypatch.setenv("ENDOARSS_DATA", str(tmp_path / "elsewhere"))
    assert data_home() == tmp_path / "elsewhere"
