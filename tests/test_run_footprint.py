"""A finished run keeps what it needs (result.json, best.pt, config, logs) and drops the resume state last.pt
(trainable weights + optimiser state, about 3x best.pt) unless ``keep_last=true``; an unfinished run keeps it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from endoarss_lib import preset
from endoarss_lib.training.engine import build_run_model, fit, load_checkpoint, run_dir, weights_digest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = dict(image_size=56, synthetic_n_train=24, synthetic_n_test=12, batch_size=6, progress=False,
             model={"backbone": "vit_tiny_patch14", "arch": "tesla"})


def small(tmp_path, **overrides):
    return preset("smoke", out_dir=str(tmp_path / "runs"), **{**SMALL, **overrides})


def test_finished_run_drops_last_pt_and_keeps_what_it_needs(tmp_path):
    cfg = small(tmp_path, epochs=1)
    row = fit(cfg)
    folder = Path(row["run_dir"])
    names = {p.name for p in folder.iterdir()}
    assert "last.pt" not in names
    assert {"config.json", "best.pt", "log.csv", "result.json"} <= names
    # the finished run is still returned as it is, and its selected model still loads
    assert fit(cfg) == json.loads((folder / "result.json").read_text())
    model = build_run_model(cfg)
    ckpt = load_checkpoint(folder / "best.pt", model, cfg.results_hash(), weights_digest(model))
    assert ckpt["epoch"] == row["best_epoch"]


def test_interrupted_run_keeps_last_pt_until_it_finishes(tmp_path):
    cfg = small(tmp_path, epochs=2)
    stopped = fit(small(tmp_path, epochs=2, stop_after_epochs=1))
    assert stopped["status"] == "stopped"
    last = Path(stopped["run_dir"]) / "last.pt"
    assert last.is_file() and torch.load(last, weights_only=True)["epoch"] == 1
    row = fit(cfg)  # resumes from last.pt, finishes, then drops it
    assert row["epochs"] == 2 and not last.exists()


def test_keep_last_keeps_the_resume_state_and_is_no_part_of_the_run_identity(tmp_path):
    kept = small(tmp_path, epochs=1, keep_last=True)
    assert kept.results_hash() == small(tmp_path, epochs=1).results_hash()
    assert run_dir(kept) == run_dir(small(tmp_path, epochs=1))
    row = fit(kept)
    ckpt = torch.load(Path(row["run_dir"]) / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["optimizer"]["state"]  # the full resume state, optimiser included
