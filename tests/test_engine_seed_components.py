"""The seed components inside the training engine: CGL (class counts from the training split only, a seeded
generator that is part of the checkpoint), GM-Coord (progress scores from the batch, per-epoch log) and CMoE
(routing.csv) -- and an interrupted run with all three resumes bitwise-identically to an uninterrupted one."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from endoarss_lib.config import TrainConfig, apply_overrides, preset
from endoarss_lib.evaluation.inference import load_run_model
from endoarss_lib.training.engine import _build_state, _loader, evaluate, fit, make_datasets
from endoarss_lib.training.losses import CGLLoss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = dict(image_size=56, synthetic_n_train=24, synthetic_n_test=12, batch_size=6, progress=False)
SEED_PARTS = dict(cls_loss="cgl", cls_loss_hparams={"p": 0.3}, weighting="gm_coord",
                  weighting_hparams={"alpha": 0.5, "noise": 0.5, "momentum": 0.5},
                  model={"backbone": "vit_tiny_patch14", "arch": "tesla", "connector": "cmoe",
                         "cmoe_router": "soft", "cmoe_experts": 3, "head_channels": 32})


def small(tmp_path, **overrides):
    return preset("smoke", out_dir=str(tmp_path / "runs"), **{**SMALL, **overrides})


def test_resume_with_cgl_gm_coord_and_cmoe_equals_uninterrupted_run(tmp_path):
    common = dict(epochs=2, keep_last=True, **SEED_PARTS)
    straight = fit(small(tmp_path / "a", **common))
    stopped = fit(small(tmp_path / "b", stop_after_epochs=1, **common))
    assert stopped["status"] == "stopped"
    resumed = fit(small(tmp_path / "b", **common))
    for key in [k for k in straight if k.startswith(("test_", "val_"))]:
        a, b = straight[key], resumed[key]
        assert (math.isnan(a) and math.isnan(b)) or a == b, key
    dir_a, dir_b = Path(straight["run_dir"]), Path(resumed["run_dir"])
    last_a = torch.load(dir_a / "last.pt", weights_only=True)
    last_b = torch.load(dir_b / "last.pt", weights_only=True)
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    assert torch.equal(last_a["cls_loss"]["generator"], last_b["cls_loss"]["generator"])
    assert torch.equal(last_a["weighting"]["generator"], last_b["weighting"]["generator"])
    for name in ("log.csv", "routing.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(dir_a / name).drop(columns="wall_time_s", errors="ignore"),
                                      pd.read_csv(dir_b / name).drop(columns="wall_time_s", errors="ignore"))
    log = pd.read_csv(dir_a / "log.csv")
    for t in ("cls", "seg"):
        assert log[f"gm_score_{t}"].between(0, 1).all() and log[f"gm_k_{t}"].between(0, 1).all()
        assert log[f"routing_entropy_{t}"].between(0, math.log(3) + 1e-9).all()
    assert (log["routing_js"] >= 0).all() and (log["gm_active"] == 1).all()
    routing = pd.read_csv(dir_a / "routing.csv")
    assert list(routing.columns) == ["epoch", "task", "entropy", "expert0", "expert1", "expert2"]
    assert len(routing) == 2 * 2
    np.testing.assert_allclose(routing[["expert0", "expert1", "expert2"]].sum(axis=1), 1.0, atol=1e-6)
    assert straight["cls_loss"] == "cgl" and straight["connector"] == "cmoe" and straight["weighting"] == "gm_coord"
    # the selected model rebuilt from the run folder (frozen random backbone from the run seed) gives the same test
    # metrics as the run itself
    cfg = small(tmp_path / "a", **common)
    data = make_datasets(cfg)
    spec = data["train"].spec
    again = evaluate(load_run_model(dir_a), _loader(data["test"], cfg, shuffle=False), torch.device("cpu"), cfg.tasks,
                     spec.num_activities, spec.num_seg_classes, distances=False)
    assert again["cls_accuracy"] == straight["test_cls_accuracy"]
    assert again["seg_miou"] == straight["test_seg_miou"]


def test_cgl_counts_come_from_the_training_split_only(tmp_path):
    cfg = small(tmp_path, dataset="mtlendovis", synthetic_n_train=60, cls_loss="cgl")
    datasets = make_datasets(cfg)
    state = _build_state(cfg, datasets, torch.device("cpu"))
    loss = state["cls_loss"]
    assert isinstance(loss, CGLLoss)
    np.testing.assert_array_equal(loss.class_counts, datasets["train"].class_counts())
    assert loss.class_counts.sum() == len(datasets["train"]) < len(datasets["train"]) + len(datasets["val"])
    assert (loss.groups == "tail").any() and (loss.groups == "head").any()  # the long-tailed preset
    # seeded from the run seed, independent of the global RNG
    again = _build_state(cfg, datasets, torch.device("cpu"))["cls_loss"]
    assert torch.equal(loss.generator.get_state(), again.generator.get_state())
    other = _build_state(small(tmp_path, dataset="mtlendovis", synthetic_n_train=60, cls_loss="cgl", seed=1),
                         datasets, torch.device("cpu"))["cls_loss"]
    assert not torch.equal(loss.generator.get_state(), other.generator.get_state())
    assert _build_state(small(tmp_path), datasets, torch.device("cpu"))["cls_loss"] is None  # CE


def test_config_fields_validation_and_hashes():
    # the hash follows every field that can change results, and nothing else
    assert preset("smoke").results_hash() == preset("smoke", out_dir="elsewhere", progress=False,
                                                    num_workers=2).results_hash()
    assert preset("smoke").results_hash() != preset("paper", data_root="/x").results_hash()
    assert preset("smoke", cls_loss="cgl").results_hash() != preset("smoke").results_hash()
    assert preset("smoke", cls_loss="cgl", cls_loss_hparams={"p": 0.2}).results_hash() != preset(
        "smoke", cls_loss="cgl").results_hash()
    with pytest.raises(ValueError, match="cls_loss='focal'"):
        TrainConfig(cls_loss="focal")
    with pytest.raises(ValueError, match=r"unknown keys \['q'\]"):
        TrainConfig(cls_loss="cgl", cls_loss_hparams={"q": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig(cls_loss_hparams={"p": 0.1})  # CE takes none
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(cls_loss="cgl", label_smoothing=0.1)
    cfg = apply_overrides(preset("smoke"), ["cls_loss=cgl", "cls_loss_hparams={p: 0.2, grouping: percentile}",
                                            "weighting=gm_coord", "model.connector=cmoe", "model.cmoe_router=sparse"])
    assert cfg.cls_loss_hparams == {"p": 0.2, "grouping": "percentile"} and cfg.model.cmoe_router == "sparse"
