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


def test_model_options_parse_the_sma_suffix():
    from endoarss_lib.experiments import model_options
    assert model_options("dinov2_vitb14+sma", "tesla") == {"backbone": "dinov2_vitb14", "arch": "tesla", "sma": True}
    assert model_options("resnet_tiny", "hps")["sma"] is False
    with pytest.raises(ValueError, match="backbone='x\\+y'"):
        model_options("x+y", "hps")


def test_delta_m_against_single_by_hand():
    import pandas as pd
    from endoarss_lib.experiments import delta_m_against_single
    base = dict(backbone="b", sma=False, seed=0)
    rows = pd.DataFrame([
        {**base, "arch": "tesla", "tasks": "cls+seg", "test_cls_accuracy": 0.6, "test_seg_miou": 0.55,
         "test_seg_hd95": 8.0},
        {**base, "arch": "single", "tasks": "cls", "test_cls_accuracy": 0.5},
        {**base, "arch": "single", "tasks": "seg", "test_seg_miou": 0.5, "test_seg_hd95": 10.0},
    ])
    metrics = {"test_cls_accuracy": True, "test_seg_miou": True, "test_seg_hd95": False}
    out = delta_m_against_single(rows, metrics)
    # mean of +20 %, +10 %, +20 % (HD lower is better)
    assert out.loc[0, "delta_m"] == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    assert np.isnan(out.loc[1, "delta_m"]) and np.isnan(out.loc[2, "delta_m"])


def test_make_configs_adds_single_task_baselines_once():
    from endoarss_lib.experiments import make_configs
    combos = grid(backbone=["vit_tiny_patch14+sma"], arch=["hps", "tesla"], weighting=["ew"], seed=[0, 1])
    configs = make_configs(combos, model_extra={"sma_dim": 8}, epochs=1, image_size=56)
    assert len(configs) == 4 + 2 * 2  # 4 MTL runs, cls-only and seg-only per seed
    tesla = configs["vit_tiny_patch14+sma | tesla | ew | seed 1"]
    assert tesla.model == {"backbone": "vit_tiny_patch14", "arch": "tesla", "sma": True, "sma_dim": 8}
    assert tesla.seed == 1 and tesla.epochs == 1
    assert configs["vit_tiny_patch14+sma | single seg | seed 0"].model["tasks"] == ["seg"]
