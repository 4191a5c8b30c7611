"""Training engine: resume equals uninterrupted, reproducibility, a real learning signal, every method trains."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from endoarss_lib.config import preset
from endoarss_lib.models import build_model
from endoarss_lib.training.engine import (CheckpointMismatch, _loader, evaluate, fit, make_datasets, run_dir,
                                          seed_everything)
from endoarss_lib.weighting import available_weightings, get_weighting

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = dict(image_size=56, synthetic_n_train=24, synthetic_n_test=12, batch_size=6, progress=False,
             model={"backbone": "vit_tiny_patch14", "arch": "tesla"})


def small(tmp_path, **overrides):
    return preset("smoke", out_dir=str(tmp_path / "runs"), **{**SMALL, **overrides})


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    # DB-MTL (EMA state), a step scheduler and augmentation: every piece of state must survive the restart.
    common = dict(epochs=3, weighting="db_mtl", scheduler="step", step_size=1, gamma=0.5, keep_last=True)
    straight = fit(small(tmp_path / "a", **common))
    stopped = fit(small(tmp_path / "b", stop_after_epochs=1, **common))
    assert stopped["status"] == "stopped" and stopped["epoch"] == 1
    resumed = fit(small(tmp_path / "b", **common))
    metrics = [k for k in straight if k.startswith(("test_", "val_"))]
    for key in metrics:
        a, b = straight[key], resumed[key]
        assert (math.isnan(a) and math.isnan(b)) or a == b, key
    last_a = torch.load(Path(straight["run_dir"]) / "last.pt", weights_only=True)
    last_b = torch.load(Path(resumed["run_dir"]) / "last.pt", weights_only=True)
    assert last_a["model"].keys() == last_b["model"].keys()
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    pd.testing.assert_frame_equal(pd.read_csv(Path(straight["run_dir"]) / "log.csv").drop(columns="wall_time_s"),
                                  pd.read_csv(Path(resumed["run_dir"]) / "log.csv").drop(columns="wall_time_s"))


def test_same_seed_gives_identical_metrics_and_other_seed_differs(tmp_path):
    one = fit(small(tmp_path / "1", epochs=1))
    two = fit(small(tmp_path / "2", epochs=1))
    other = fit(small(tmp_path / "3", epochs=1, seed=1))
    keys = ["test_cls_accuracy", "test_seg_miou", "val_seg_miou", "test_seg_pixel_acc"]
    assert [one[k] for k in keys] == [two[k] for k in keys]
    assert one["config_hash"] != other["config_hash"]
    assert [one[k] for k in keys] != [other[k] for k in keys]


def test_finished_run_is_returned_not_retrained(tmp_path):
    cfg = small(tmp_path, epochs=1)
    row = fit(cfg)
    result = Path(row["run_dir"]) / "result.json"
    mtime = result.stat().st_mtime_ns
    assert fit(cfg) == json.loads(result.read_text())
    assert result.stat().st_mtime_ns == mtime


def test_checkpoint_of_another_config_is_refused_and_nothing_is_lost(tmp_path):
    fit(small(tmp_path, epochs=2, run_name="shared", stop_after_epochs=1))
    folder = tmp_path / "runs" / "shared"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CheckpointMismatch, match=r"holds the run of another config .* nothing was changed"):
        fit(small(tmp_path, epochs=2, run_name="shared", lr=1e-4))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # config.json untouched, run kept


def test_training_improves_validation_metrics_over_the_untrained_model(tmp_path):
    # A trainable ResNet on the synthetic ESD scenes: activity and foreground segmentation must both be learnt.
    # Generator 1.1 draws thin and look-alike classes: 96 training images (measured: val fg mIoU 0.07 against 0.001
    # untrained; with 48 images 0.035, short of the margin).
    cfg = small(tmp_path, image_size=112, synthetic_n_train=96, epochs=8,
                model={"backbone": "resnet_tiny", "arch": "hps"})
    datasets = make_datasets(cfg)
    spec = datasets["train"].spec
    seed_everything(cfg.seed)
    untrained = build_model(backbone="resnet_tiny", arch="hps", num_activities=spec.num_activities,
                            num_seg_classes=spec.num_seg_classes, image_size=cfg.image_size)
    before = evaluate(untrained, _loader(datasets["val"], cfg, shuffle=False), torch.device("cpu"), cfg.tasks,
                      spec.num_activities, spec.num_seg_classes, distances=False)
    after = fit(cfg)
    assert after["val_cls_accuracy"] >= before["cls_accuracy"] + 0.3
    assert after["val_seg_miou_fg"] >= before["seg_miou_fg"] + 0.05
    assert after["test_cls_accuracy"] > 0.6  # chance is 1/3 on three balanced activities


@pytest.mark.parametrize("weighting", available_weightings())
def test_every_weighting_trains_with_tesla(tmp_path, weighting):
    hparams = {"warmup_epochs": 1} if weighting == "STCH" else {}
    row = fit(small(tmp_path, epochs=2, weighting=weighting, weighting_hparams=hparams, keep_last=True))
    log = pd.read_csv(Path(row["run_dir"]) / "log.csv")
    assert len(log) == 2 and np.isfinite(log[["train_loss_cls", "train_loss_seg"]].to_numpy()).all()
    # the method named in the row is the one that ran: its state took one step per optimisation step
    state = torch.load(Path(row["run_dir"]) / "last.pt", weights_only=True)["weighting"]
    assert state["name"] == get_weighting(weighting).name and state["step"] == 2 * math.ceil(20 / 6)
    assert row["weighting"] == weighting.lower().replace("-", "_")  # one canonical spelling of the method's name


@pytest.mark.parametrize("arch,backbone,marker", [("hps", "vit_tiny_patch14", "lora_A"),
                                                  ("mmoe", "vit_tiny_patch14", "gates.seg"),
                                                  ("dselect_k", "vit_tiny_patch14", "gates.seg.w_logits"),
                                                  ("tesla", "resnet_tiny", "tesla_A")])
def test_every_architecture_trains(tmp_path, arch, backbone, marker):
    row = fit(small(tmp_path, epochs=1, model={"backbone": backbone, "arch": arch}))
    saved = torch.load(Path(row["run_dir"]) / "best.pt", weights_only=True)["model"]
    # the checkpoint holds the architecture's own trainable parts (and the row says which it was)
    assert any(marker in k for k in saved), sorted(saved)[:10]
    assert not any("tesla_A" in k for k in saved) or arch == "tesla"
    assert np.isfinite(row["test_seg_miou"]) and row["arch"] == arch


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_single_task_baselines_use_the_same_engine(tmp_path, task):
    row = fit(small(tmp_path, epochs=1, model={"backbone": "vit_tiny_patch14", "arch": "single", "tasks": [task]}))
    other = "seg" if task == "cls" else "cls"
    assert any(k.startswith(f"test_{task}_") for k in row)
    assert not any(k.startswith(f"test_{other}_") for k in row)


def test_result_row_has_every_field_and_files_exist(tmp_path):
    row = fit(small(tmp_path, epochs=1, diagnostics_every=1, keep_last=True))
    for field in ("dataset", "data", "backbone", "pretrained", "random_init_backbone", "arch", "weighting", "seed",
                  "preset", "epochs", "wall_time_s", "device", "peak_memory_mib", "library_version", "git_commit",
                  "config_hash", "test_cls_accuracy", "test_cls_compat_ac", "test_seg_miou", "test_seg_hd",
                  "test_seg_compat_hd", "test_seg_ssim"):
        assert field in row, field
    assert row["data"] == "synthetic" and row["pretrained"] == "random init"
    folder = Path(row["run_dir"])
    assert {p.name for p in folder.iterdir()} >= {"config.json", "last.pt", "best.pt", "log.csv",
                                                  "diagnostics.csv", "result.json"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    diag = pd.read_csv(folder / "diagnostics.csv")
    assert len(diag) == math.ceil(20 / 6)  # one row per step: ceil(train images / batch)
    assert diag["cosine"].between(-1, 1).all() and diag["magnitude_similarity"].between(0, 1).all()
    assert any(c.startswith("block00/") for c in diag.columns)


def test_run_dir_is_named_by_config(tmp_path):
    a, b = small(tmp_path), small(tmp_path, lr=1e-4)
    assert run_dir(a) != run_dir(b)
    assert run_dir(small(tmp_path, run_name="x")).name == "x"


def test_cli_and_torchrun_data_parallel(tmp_path):
    env = {**os.environ, "ENDOARSS_DATA": str(tmp_path / "data")}
    args = ["--preset", "smoke", "epochs=1", f"out_dir={tmp_path / 'runs'}", "progress=false", "image_size=56",
            "synthetic_n_train=24", "synthetic_n_test=12"]
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "endoarss_lib.train", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout[done.stdout.index("{"):])
    assert Path(row["run_dir"], "result.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "endoarss_lib.train", "--preset", "smoke", "epochs=0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "epochs=0" in bad.stderr


def test_a_run_folders_config_json_reproduces_the_run(tmp_path):
    # `python -m endoarss_lib.train --config <run>/config.json` (how results/demonstration/<run>/ is reproduced): the
    # file names the same run (its recorded config_hash), so the command meets the finished run and returns its row
    import contextlib
    import io
    import json
    import warnings

    from endoarss_lib import train
    from endoarss_lib.config import load_config

    row = fit(small(tmp_path, epochs=1))
    config_json = Path(row["run_dir"]) / "config.json"
    recorded = json.loads(config_json.read_text())["config_hash"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "written for another run" warning
        cfg = load_config(config_json)
    assert cfg.results_hash() == recorded
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(["--config", str(config_json), "--quiet"]) == 0
    again = json.loads(out.getvalue())
    assert again["test_cls_accuracy"] == row["test_cls_accuracy"]
    assert again["test_seg_miou"] == row["test_seg_miou"]
    # an edited copy names another run: said, and it would train a new folder
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**json.loads(config_json.read_text()), "epochs": 2}))
    with pytest.warns(UserWarning, match="new run folder"):
        assert load_config(edited).results_hash() != recorded
