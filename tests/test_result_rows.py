"""One result-row schema with provenance: what training writes, what an old row says when read back, the git dirty
flag against real repositories, and the deterministic switch on the CPU."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from endoarss_lib import version
from endoarss_lib.config import preset
from endoarss_lib.experiments.results import (ROW_FIELDS, SCHEMA_VERSION, ResultRow, Row, RowKeyError, load_rows,
                                              read_row)
from endoarss_lib.training import engine

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = dict(image_size=56, synthetic_n_train=16, synthetic_n_test=8, batch_size=8, epochs=1, progress=False,
            model={"backbone": "vit_tiny_patch14", "arch": "hps"})


def test_provenance_names_this_process_software():
    env = version.environment("cpu")
    assert env["python_version"] == platform.python_version() and env["platform"] == platform.platform()
    assert env["torch_version"] == torch.__version__ and env["cuda_version"] == torch.version.cuda
    assert env["cudnn_version"] == (torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    assert env["gpu_name"] is None  # the CPU has no GPU name
    if torch.cuda.is_available():
        assert version.environment("cuda")["gpu_name"] == torch.cuda.get_device_name(0)


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_git_dirty_flag_on_a_real_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("ignored/\n")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(version, "_checkout", lambda: repo)
    assert version.git_dirty() is False
    (repo / "ignored").mkdir()
    (repo / "ignored" / "run.json").write_text("{}")
    assert version.git_dirty() is False  # ignored files are not changes
    (repo / "a.py").write_text("x = 2\n")
    assert version.git_dirty() is True  # a modified tracked file
    _git(repo, "checkout", "-q", "--", "a.py")
    (repo / "new.py").write_text("")
    assert version.git_dirty() is True  # an untracked file no commit holds
    monkeypatch.setattr(version, "_checkout", lambda: None)
    assert version.git_dirty() is None and version.git_commit() == "unknown"  # not a git checkout


def test_training_writes_the_schema_with_provenance(tmp_path):
    row = engine.fit(preset("smoke", out_dir=str(tmp_path), **TINY))
    assert list(row)[:2] == ["schema_version", "source"] and row["schema_version"] == SCHEMA_VERSION
    assert row["source"] == "train" and set(ROW_FIELDS) <= set(row)
    assert row["torch_version"] == torch.__version__ and row["python_version"] == platform.python_version()
    assert row["gpu_name"] is None and row["device"] == "cpu" and row["deterministic"] is False
    assert row["git_dirty"] in (True, False, None) and row["git_commit"] == version.git_commit()
    stored = json.loads((Path(row["run_dir"]) / "result.json").read_text())
    assert json.dumps(stored) == json.dumps(row)  # stored as returned (json: NaN == NaN)
    assert engine.fit(preset("smoke", out_dir=str(tmp_path), **TINY)) == stored  # a finished run: its stored row


def test_an_old_row_says_what_it_lacks(tmp_path):
    old = {"dataset": "mtlesd", "tasks": "cls+seg", "test_cls_accuracy": 0.5, "test_seg_miou": 0.25}
    row = read_row(old)
    assert row["schema_version"] == 0 and row["torch_version"] is None and row["git_dirty"] is None
    assert set(row.missing) == set(ROW_FIELDS) - {"dataset", "tasks"}
    with pytest.raises(RowKeyError, match=r"no 'test_presence_map'.*schema version 0.*'torch_version'.*cls\+seg"):
        row["test_presence_map"]
    with pytest.raises(KeyError, match=r"its test metrics: \['test_cls_accuracy', 'test_seg_miou'\]"):
        row["test_cls_macro_f1"]
    assert read_row(ResultRow(source="train", dataset="mtlesd").to_dict()).missing == ()
    # rows.json written before the schema: the frame has every schema column, the old ones None
    (tmp_path / "rows.json").write_text(json.dumps([old]))
    frame = load_rows([tmp_path])
    assert set(ROW_FIELDS) <= set(frame) and frame.loc[0, "test_cls_accuracy"] == 0.5
    assert frame["torch_version"].isna().all()


def test_result_row_refuses_ambiguous_keys():
    with pytest.raises(ValueError, match="source='training'"):
        ResultRow(source="training")
    with pytest.raises(ValueError, match=r"\['dataset'\] appear twice"):
        ResultRow(source="train", extra={"dataset": "x"})
    with pytest.raises(ValueError, match=r"\['test_a_b'\] appear twice"):
        ResultRow(source="train", metrics={"test_a_b": 1.0}, extra={"test_a_b": 2.0})
    assert isinstance(ResultRow(source="prior").to_dict(), Row)


def test_deterministic_switch_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    original = engine._train_epoch

    def spy(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                     torch.backends.cudnn.benchmark))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_train_epoch", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    cfg = preset("smoke", out_dir=str(tmp_path / "a"), deterministic=True, **TINY)
    row = engine.fit(cfg)
    assert seen == [(True, ":4096:8", False)]  # during training: deterministic algorithms, cuBLAS workspace set
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    assert row["deterministic"] is True
    again = engine.fit(cfg.replace(out_dir=str(tmp_path / "b")))
    assert {k: v for k, v in again.items() if k.startswith("test_")} == \
        {k: v for k, v in row.items() if k.startswith("test_")}
    # the switch enters the results hash only when on: unchanged configurations keep their run folders
    assert preset("smoke", deterministic=False).results_hash() == preset("smoke").results_hash()
    assert cfg.results_hash() != cfg.replace(deterministic=False).results_hash()
