"""The experiment helper and runner: grids, named configs with single-task baselines, parameter checks, evaluating a
run on another dataset, subset metrics and Delta_m against single-task rows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import jaccard_score

from endoarss_lib.config import ConfigError
from endoarss_lib.data import make_synthetic
from endoarss_lib.evaluation.inference import evaluate_run_on
from endoarss_lib.experiments.experiment import Experiment, model_options
from endoarss_lib.experiments.results import delta_m_against_single
from endoarss_lib.metrics import subset_metrics
from endoarss_lib.training.runner import grid, run_grid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = {"backbone": "vit_tiny_patch14", "pretrained": False}


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
    assert subset_metrics(confusion, [1, 2])["miou"] == pytest.approx(subset_metrics(confusion, [1])["miou"])


def test_evaluate_run_on_the_generalisation_set(tmp_path):
    exp = Experiment("t", dataset="mtlendovis", image_size=56, epochs=1, n_train=24, n_test=12,
                     out_dir=tmp_path, model={**TINY, "arch": "tesla"})
    rows = exp.run({"tesla": exp.config()})
    gen = make_synthetic(tmp_path / "gen", "mtlendovis_gen", n_test=8, image_size=56)
    out = evaluate_run_on(rows.loc[0, "run_dir"], gen, "mtlendovis_gen", image_size=56)
    assert out["dataset"] == "synthetic_mtlendovis_gen" and out["data"] == "synthetic"
    # the evaluated-subset mean is the mean of the per-class IoUs of the subset's present classes
    iou = np.asarray(out.values["seg"]["iou_per_class"], float)
    ids = [0, 1, 2, 3, 4, 6]
    assert out["seg_miou_eval"] == pytest.approx(np.nanmean(iou[ids]))
    assert out["seg_miou"] == pytest.approx(np.nanmean(iou))


def test_model_options_parse_the_sma_suffix():
    assert model_options("dinov2_vitb14+sma", arch="tesla") == {"backbone": "dinov2_vitb14", "arch": "tesla",
                                                                 "sma": True}
    assert model_options("vit_mini_patch14")["pretrained"] == "synthdino_vit_mini14"  # the bundled weights
    assert model_options("resnet_tiny", arch="hps")["sma"] is False
    with pytest.raises(ValueError, match="model='x\\+y'"):
        model_options("x+y")


def test_delta_m_against_single_by_hand():
    base = dict(backbone="b", sma=False, seed=0)
    rows = pd.DataFrame([
        {**base, "arch": "tesla", "tasks": "cls+seg", "test_cls_accuracy": 0.6, "test_seg_miou": 0.55,
         "test_seg_hd95": 8.0},
        {**base, "arch": "single", "tasks": "cls", "test_cls_accuracy": 0.5},
        {**base, "arch": "single", "tasks": "seg", "test_seg_miou": 0.5, "test_seg_hd95": 10.0},
    ])
    metrics = {"test_cls_accuracy": True, "test_seg_miou": True, "test_seg_hd95": False}
    out = delta_m_against_single(rows, metrics)
    # LibMTL: per task first: cls +20 %; seg mean of +10 % (mIoU) and +20 % (HD95, lower is better) = +15 %
    assert out.loc[0, "delta_m"] == pytest.approx((0.2 + 0.15) / 2)
    assert np.isnan(out.loc[1, "delta_m"]) and np.isnan(out.loc[2, "delta_m"])


def test_experiment_grid_adds_single_task_baselines_once(tmp_path):
    exp = Experiment("t", epochs=1, image_size=56, out_dir=tmp_path)
    configs = exp.grid(["vit_tiny_patch14+sma"], ["hps", "tesla"], seeds=[0, 1], model={"sma_dim": 8})
    assert {(k.variant, k.seed) for k in configs} >= {("vit_tiny_patch14+sma | tesla | ew", 1),
                                                      ("vit_tiny_patch14+sma | single cls", 0)}  # typed keys
    assert len(configs) == 4 + 2 * 2  # 4 MTL runs, cls-only and seg-only per seed
    tesla = configs["vit_tiny_patch14+sma | tesla | ew | seed 1"]
    assert (tesla.model.backbone, tesla.model.arch, tesla.model.sma, tesla.model.sma_dim) == (
        "vit_tiny_patch14", "tesla", True, 8)
    assert tesla.seed == 1 and tesla.epochs == 1 and tesla.image_size == 56
    assert configs["vit_tiny_patch14+sma | single seg | seed 0"].model.tasks == ("seg",)
    assert exp.config().model.pretrained == "synthdino_vit_mini14"  # the default model


@pytest.mark.parametrize("params, culprit", [
    (dict(dataset="foo"), "dataset='foo'"), (dict(image_size=100), "image_size=100"),
    (dict(epochs=0), "epochs=0"), (dict(n_train="many"), "n_train='many'"), (dict(epochs=2.5), "epochs=2.5"),
])
def test_experiment_names_the_bad_parameter(tmp_path, params, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        Experiment("t", out_dir=tmp_path / "x", **params)
    assert not (tmp_path / "x").exists()  # nothing made for a bad parameter


def test_run_grid_isolates_a_failed_configuration(tmp_path, monkeypatch):
    exp = Experiment("t", image_size=56, epochs=1, n_train=24, n_test=8, out_dir=tmp_path,
                     model={**TINY, "arch": "hps"})
    good = exp.config()
    bad = exp.config(data_root=str(tmp_path / "missing"), synthetic=False)
    rows = run_grid({"bad": bad, "good": good}, raise_on_failure=False, progress=False)
    assert list(rows["name"]) == ["bad", "good"]
    assert rows.loc[0, "status"] == "failed" and "missing" in rows.loc[0, "error"]
    assert rows.loc[1, "status"] == "ok" and np.isfinite(rows.loc[1, "test_cls_accuracy"])
    with pytest.raises(RuntimeError, match="1 of 2 run"):
        run_grid({"bad": bad, "good": good}, progress=False)


def test_auto_jobs_one_per_core_or_per_gpu(monkeypatch):
    from endoarss_lib.training import runner

    monkeypatch.setattr(runner, "cpu_cores", lambda: 2)
    assert runner.auto_jobs(5, ["cpu"], gpus=[]) == 2          # one run per core on a CPU
    assert runner.auto_jobs(1, ["cpu"], gpus=[]) == 1          # never more workers than runs
    assert runner.auto_jobs(5, ["cuda"], gpus=["0", "1", "2"]) == 3  # one per GPU for CUDA runs
    assert runner.auto_jobs(5, ["cpu"], gpus=["0"]) == 2       # CPU runs ignore the GPUs
    monkeypatch.setattr(runner, "cpu_cores", lambda: 64)
    assert runner.auto_jobs(100, ["cpu"], gpus=[]) == 8        # capped (memory)


def test_config_merges_model_options_into_the_experiments_model(tmp_path):
    exp = Experiment("t", epochs=1, image_size=56, out_dir=tmp_path, model={**TINY, "arch": "tesla", "lora_rank": 2})
    hps = exp.config(model={"arch": "hps"})  # only the architecture changes, as TrainConfig.replace merges
    assert (hps.model.backbone, hps.model.arch, hps.model.lora_rank, hps.model.pretrained) == (
        "vit_tiny_patch14", "hps", 2, False)
    assert hps.results_hash() == exp.config().replace(model={"arch": "hps"}).results_hash()
    # the hand-written merge of earlier notebooks gives the same config
    assert exp.config(model={**exp.default_model, "arch": "hps"}).results_hash() == hps.results_hash()
    other = exp.config(model="resnet_tiny")  # a new backbone drops the weights that belong to the old one
    assert other.model.backbone == "resnet_tiny" and other.model.pretrained is False and other.model.arch == "tesla"


def test_variants_are_typed_keys_and_rows_carry_variant_and_seed(tmp_path):
    from endoarss_lib.experiments.experiment import RunKey

    exp = Experiment("t", epochs=1, image_size=56, n_train=16, n_test=8, out_dir=tmp_path,
                     model={**TINY, "arch": "hps"})
    configs = exp.variants({"hps": {}, "tesla db": {"arch": "tesla", "weighting": "db_mtl"}}, seeds=[0, 1],
                           batch_size=8)
    assert list(configs) == [RunKey("hps", 0), RunKey("hps", 1), RunKey("tesla db", 0), RunKey("tesla db", 1)]
    key = list(configs)[3]
    assert (key.variant, key.seed) == ("tesla db", 1) and key == "tesla db | seed 1"  # still the old string
    tesla = configs["tesla db | seed 1"]
    assert (tesla.model.arch, tesla.weighting, tesla.seed, tesla.batch_size) == ("tesla", "db_mtl", 1, 8)
    with pytest.raises(ConfigError, match="'learning_rate' is neither a model option nor a run field"):
        exp.variants({"x": {"learning_rate": 0.1}})
    rows = exp.run({k: v for k, v in configs.items() if k.seed == 0})
    assert list(rows.columns[:3]) == ["name", "variant", "seed"]
    assert rows["variant"].tolist() == ["hps", "tesla db"] and rows["seed"].tolist() == [0, 0]
    assert rows["name"].tolist() == ["hps | seed 0", "tesla db | seed 0"]
    assert rows.loc[1, "arch"] == "tesla" and rows.loc[1, "weighting"] == "db_mtl"
