"""Experiment helpers: grids, subset metrics, evaluating a run on another dataset."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import jaccard_score

from endoarss_lib.config import preset
from endoarss_lib.data import make_synthetic
from endoarss_lib.experiments import evaluate_run_on, grid, run_all, subset_metrics

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_grid_is_the_cartesian_product():
    assert grid(a=[1, 2], b=["x", "y"]) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"},
                                            {"a": 2, "b": "y"}]
    assert grid() == [{}]


def test_subset_metrics_match_sklearn_on_the_subset():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 5, 500), rng.integers(0, 5, 500)
    confusion = np.zeros((5, 5), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    ids = [1, 3, 4]
    expected = jaccard_score(truth, pred, labels=ids, average=None).mean()
    assert subset_metrics(confusion, ids)["miou"] == pytest.approx(expected)
    confusion[2] = 0
    confusion[:, 2] = 0  # class 2 absent everywhere: NaN, left out of the mean
    assert np.isfinite(subset_metrics(confusion, [1, 2])["miou"])


def test_evaluate_run_on_the_generalisation_set(tmp_path):
    cfg = preset("smoke", dataset="mtlendovis", image_size=56, epochs=1, synthetic_n_train=24,
                 synthetic_n_test=12, out_dir=str(tmp_path / "runs"), progress=False)
    rows = run_all({"tesla": cfg}, progress=False)
    gen = make_synthetic(tmp_path / "gen", "mtlendovis_gen", n_test=8, image_size=56)
    out = evaluate_run_on(rows.loc[0, "run_dir"], gen, "mtlendovis_gen", image_size=56)
    assert out["dataset"] == "synthetic_mtlendovis_gen" and out["data"] == "synthetic"
    for key in ("cls_accuracy", "seg_miou", "seg_miou_eval", "seg_dice_eval", "seg_compat_hd"):
        assert key in out
    assert 0 <= out["seg_miou_eval"] <= 1
