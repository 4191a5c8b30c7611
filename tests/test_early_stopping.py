"""Early stopping (patience) and the per-image test outcomes a finished run keeps."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

from endoarss_lib.config import ConfigError, preset
from endoarss_lib.evidence.outcomes import outcome_value
from endoarss_lib.training.engine import PER_IMAGE_FILE, fit, read_per_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = dict(image_size=56, synthetic_n_train=24, synthetic_n_test=12, batch_size=6, progress=False,
             model={"backbone": "vit_tiny_patch14", "arch": "tesla"})


def small(tmp_path, **overrides):
    return preset("smoke", out_dir=str(tmp_path / "runs"), **{**SMALL, **overrides})


def test_patience_stops_once_the_score_has_not_improved(tmp_path):
    row = fit(small(tmp_path, epochs=12, patience=1, lr=3e-2))
    log = pd.read_csv(f"{row['run_dir']}/log.csv")
    best = int(log["select_score"].idxmax()) + 1  # the first epoch with the highest score
    assert row["best_epoch"] == best and row["epochs_trained"] == len(log)
    if row["epochs_trained"] < 12:  # stopped early: exactly one epoch without improvement after the best
        assert row["epochs_trained"] == best + 1
    assert row["patience"] == 1


def test_early_stopping_resumes_where_an_uninterrupted_run_stops(tmp_path):
    common = dict(epochs=8, patience=2, lr=3e-2)
    straight = fit(small(tmp_path / "a", **common))
    stopped = fit(small(tmp_path / "b", stop_after_epochs=2, **common))
    assert stopped["status"] == "stopped"
    resumed = fit(small(tmp_path / "b", **common))
    assert resumed["epochs_trained"] == straight["epochs_trained"]
    for key in (k for k in straight if k.startswith("test_")):
        a, b = straight[key], resumed[key]
        assert (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == b, key


def test_patience_is_checked_and_left_out_of_old_hashes(tmp_path):
    with pytest.raises(ConfigError, match="patience"):
        small(tmp_path, patience=-1)
    assert small(tmp_path, patience=0).results_hash() == small(tmp_path).results_hash()
    assert small(tmp_path, patience=3).results_hash() != small(tmp_path).results_hash()


def test_per_image_outcomes_give_the_result_row(tmp_path):
    row = fit(small(tmp_path, epochs=1))
    arrays = read_per_image(row["run_dir"])
    assert len(arrays["path"]) == 12 and arrays["seg_confusion"].shape == (12, 7, 7)
    assert arrays["cls_prob"].sum(1) == pytest.approx(np.ones(12), abs=1e-5)
    assert outcome_value(arrays, "cls_accuracy") == pytest.approx(accuracy_score(arrays["cls_true"],
                                                                                 arrays["cls_pred"]))
    for key in ("cls_accuracy", "cls_macro_f1", "seg_miou", "seg_miou_fg", "seg_dice"):
        expected = row[f"test_{key}"]
        assert (math.isnan(expected) and math.isnan(outcome_value(arrays, key))) or \
            outcome_value(arrays, key) == pytest.approx(expected), key
    # the confusion counts every valid test pixel once
    assert arrays["seg_confusion"].sum() == 12 * 56 * 56
    assert (tmp_path / "runs").rglob(PER_IMAGE_FILE)
