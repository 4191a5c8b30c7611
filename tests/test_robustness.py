"""Tests of the robustness evaluation: Table VII / Fig. 6 / mCE aggregation against hand-computed frames, and
evaluate_corruptions on a tiny synthetic set (shape, clean reference, cache, warped masks, agreement with fit)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from endoarss_lib.config import preset
from endoarss_lib.data import make_synthetic
from endoarss_lib.experiments.bench import benchmark_corruptions
from endoarss_lib.experiments.viz import corruption_grid, plot_severity_curves, save_figure
from endoarss_lib.robustness import evaluation as R
from endoarss_lib.robustness.corruptions import CORRUPTIONS, corrupt
from endoarss_lib.robustness.corruptions import GROUP_OF
from endoarss_lib.robustness.evaluation import evaluate_corruptions, model_key
from endoarss_lib.robustness.report import (column_name, corruption_errors, mean_corruption_error,
                                            severity_table, table_vii)
from endoarss_lib.training.engine import fit

# ------------------------------------------------------------------------------ a hand-made two-model frame

# (accuracy, mIoU) per model and (corruption, severity); severity 0 = clean.
VALUES = {
    "A": {("clean", 0): (0.9, 0.5),
          ("gaussian_noise", 1): (0.8, 0.4), ("gaussian_noise", 2): (0.6, 0.2),
          ("smoke", 1): (0.7, 0.3), ("smoke", 2): (0.5, 0.3),
          ("contrast", 1): (0.9, 0.5), ("contrast", 2): (0.9, 0.1)},
    "B": {("clean", 0): (0.8, 0.6),
          ("gaussian_noise", 1): (0.6, 0.5), ("gaussian_noise", 2): (0.2, 0.5),
          ("smoke", 1): (0.5, 0.2), ("smoke", 2): (0.5, 0.0),
          ("contrast", 1): (0.8, 0.4), ("contrast", 2): (0.6, 0.4)},
}


def _frame(values=VALUES) -> pd.DataFrame:
    rows = [{"model": m, "corruption": c, "group": "clean" if c == "clean" else GROUP_OF[c], "severity": s,
             "cls_accuracy": ac, "seg_miou": miou}
            for m, cells in values.items() for (c, s), (ac, miou) in cells.items()]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter


def test_table_vii_by_hand():
    table = table_vii(_frame(), models=["A", "B"])
    assert table["corruption"].tolist() == ["gaussian_noise", "smoke", "contrast", "mean", "clean"]  # paper order
    assert table["group"].tolist() == ["noise", "occlusion", "digital", "", "clean"]
    assert list(table.columns) == ["group", "corruption", "AC (A)", "AC (B)", "mIoU (A)", "mIoU (B)"]
    expected = {"AC (A)": [0.7, 0.6, 0.9, 2.2 / 3, 0.9], "AC (B)": [0.4, 0.5, 0.7, 1.6 / 3, 0.8],
                "mIoU (A)": [0.3, 0.3, 0.3, 0.3, 0.5], "mIoU (B)": [0.5, 0.1, 0.4, 1.0 / 3, 0.6]}
    for column, values in expected.items():
        np.testing.assert_allclose(table[column], values, atol=1e-12)
    assert list(table_vii(_frame()).columns)[2:4] == ["AC (B)", "AC (A)"]  # default: models in order of appearance
    percent = table_vii(_frame(), percent=True)
    np.testing.assert_allclose(percent["AC (A)"], np.array(expected["AC (A)"]) * 100, atol=1e-9)


def test_table_vii_options():
    only_b = table_vii(_frame(), metrics="seg_miou", models=["B"], clean=False)
    assert list(only_b.columns) == ["group", "corruption", "mIoU (B)"]
    assert only_b["corruption"].tolist()[-1] == "mean"
    no_clean = _frame().query("severity > 0")
    assert "clean" not in table_vii(no_clean)["corruption"].tolist()
    assert column_name("cls_accuracy", "tiny ViT") == "AC (tiny ViT)"
    assert column_name("seg_dice_fg", "m") == "Dice fg (m)"  # the task registry's label


def test_severity_table_by_hand_and_consistent_with_table_vii():
    table = severity_table(_frame())
    assert table["severity"].tolist() == [0, 1, 2] and table["n_corruptions"].tolist() == [0, 3, 3]
    np.testing.assert_allclose(table["AC (A)"], [0.9, 0.8, 2.0 / 3], atol=1e-12)
    np.testing.assert_allclose(table["AC (B)"], [0.8, 1.9 / 3, 1.3 / 3], atol=1e-12)
    np.testing.assert_allclose(table["mIoU (B)"], [0.6, 1.1 / 3, 0.9 / 3], atol=1e-12)
    # complete grid: mean over severities of the per-severity means == Table VII's mean over corruptions
    vii = table_vii(_frame()).set_index("corruption")
    for column in ("AC (A)", "AC (B)", "mIoU (A)", "mIoU (B)"):
        assert table.loc[table["severity"] > 0, column].mean() == pytest.approx(vii.loc["mean", column])
        assert table.loc[table["severity"] == 0, column].item() == pytest.approx(vii.loc["clean", column])


def test_corruption_errors_by_hand():
    table = corruption_errors(_frame(), "A", "B", "cls_accuracy")
    per = table.set_index("corruption")
    # errors summed over severities: A 0.6, 0.8, 0.2; B 1.2, 1.0, 0.6
    np.testing.assert_allclose(per.loc[["gaussian_noise", "smoke", "contrast"], "error"], [0.6, 0.8, 0.2])
    np.testing.assert_allclose(per.loc[["gaussian_noise", "smoke", "contrast"], "baseline_error"], [1.2, 1.0, 0.6])
    np.testing.assert_allclose(per.loc[["gaussian_noise", "smoke", "contrast"], "ce"], [0.5, 0.8, 1 / 3])
    # relative: clean errors A 0.1, B 0.2 -> degradations A 0.4, 0.6, 0.0; B 0.8, 0.6, 0.2
    np.testing.assert_allclose(per.loc[["gaussian_noise", "smoke", "contrast"], "relative_ce"], [0.5, 1.0, 0.0],
                               atol=1e-12)
    assert per.loc["mean", "ce"] == pytest.approx((0.5 + 0.8 + 1 / 3) / 3)
    assert per.loc["mean", "relative_ce"] == pytest.approx(0.5)
    summary = mean_corruption_error(_frame(), "A", "B", "cls_accuracy")
    assert summary["mce"] == pytest.approx((0.5 + 0.8 + 1 / 3) / 3)
    assert summary["relative_mce"] == pytest.approx(0.5)
    assert summary["clean_error"] == pytest.approx(0.1) and summary["baseline_clean_error"] == pytest.approx(0.2)
    assert summary["n_corruptions"] == 3


@pytest.mark.parametrize("metric", ["cls_accuracy", "seg_miou"])
def test_baseline_against_itself_is_one(metric):
    summary = mean_corruption_error(_frame(), "B", "B", metric)
    assert summary["mce"] == pytest.approx(1.0) and summary["relative_mce"] == pytest.approx(1.0)
    assert summary["n_corruptions"] == summary["n_corruptions_relative"] == 3
    np.testing.assert_allclose(corruption_errors(_frame(), "B", "B", metric)["ce"], 1.0)


def test_baseline_that_does_not_degrade_has_no_relative_ce():
    # A's accuracy on contrast equals its clean accuracy (0.9, 0.9 vs 0.9): no degradation to compare against
    table = corruption_errors(_frame(), "B", "A", "cls_accuracy").set_index("corruption")
    assert np.isnan(table.loc["contrast", "relative_ce"]) and table.loc["contrast", "n_relative"] == 0
    # B degrades by 0.8, 0.6 where A degrades by 0.4, 0.6 (see test_corruption_errors_by_hand)
    assert table.loc["mean", "relative_ce"] == pytest.approx((2.0 + 1.0) / 2) and table.loc["mean", "n_relative"] == 2
    assert table.loc["mean", "ce"] == pytest.approx((2.0 + 1.25 + 3.0) / 3)


def test_errors_proportional_to_the_baseline_give_that_factor():
    # model errors = 0.5 x baseline errors in every cell (clean included): CE = relative CE = 0.5 on every corruption
    base = VALUES["B"]
    half = {cell: (1 - 0.5 * (1 - ac), 1 - 0.5 * (1 - miou)) for cell, (ac, miou) in base.items()}
    frame = _frame({"B": base, "half": half})
    table = corruption_errors(frame, "half", "B", "cls_accuracy")
    np.testing.assert_allclose(table["ce"], 0.5)
    np.testing.assert_allclose(table["relative_ce"], 0.5)


def test_perfect_baseline_leaves_the_corruption_out():
    values = {m: dict(cells) for m, cells in VALUES.items()}
    values["B"][("contrast", 1)] = values["B"][("contrast", 2)] = (1.0, 0.4)  # no error at all on contrast
    table = corruption_errors(_frame(values), "A", "B", "cls_accuracy").set_index("corruption")
    assert np.isnan(table.loc["contrast", "ce"])
    assert table.loc["mean", "ce"] == pytest.approx((0.5 + 0.8) / 2) and table.loc["mean", "n"] == 2
    assert table.loc[["gaussian_noise", "smoke", "contrast"], "n"].tolist() == [1, 1, 0]


def test_relative_ce_needs_clean_rows():
    summary = mean_corruption_error(_frame().query("severity > 0"), "A", "B")
    assert summary["mce"] == pytest.approx((0.5 + 0.8 + 1 / 3) / 3)
    assert np.isnan(summary["relative_mce"]) and np.isnan(summary["clean_error"])


@pytest.mark.parametrize("mutate, match", [
    (lambda f: f.drop(columns="seg_miou"), r"missing column\(s\) \['seg_miou'\]"),
    (lambda f: pd.concat([f, f.iloc[:1]]), "appears more than once"),
    (lambda f: f[~((f.model == "B") & (f.corruption == "smoke") & (f.severity == 2))], "'B' lacks the cells"),
    (lambda f: f[~((f.corruption == "smoke") & (f.severity == 2))], "different severities"),
    (lambda f: f[f.severity == 0], "no corrupted rows"),
    (lambda f: "not a frame", "expected a pandas DataFrame"),
])
def test_aggregation_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        table_vii(mutate(_frame()))


def test_aggregation_argument_errors():
    with pytest.raises(ValueError, match=r"models: \['C'\] not in the frame"):
        table_vii(_frame(), models=["A", "C"])
    with pytest.raises(ValueError, match="baseline|not in the frame"):
        corruption_errors(_frame(), "A", "C")
    bad = _frame()
    bad["seg_hd"] = 12.0
    with pytest.raises(ValueError, match="metric='seg_hd': expected a fraction"):
        corruption_errors(bad, "A", "B", "seg_hd")


# ------------------------------------------------------------------------------------------------ figures

def test_corruption_grid_and_small_png(tmp_path):
    import matplotlib.pyplot as plt

    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    fig = corruption_grid(image, names=("smoke", "gamma"), severities=(1, 5), seed=3)
    axes = np.array(fig.axes).reshape(2, 3)
    np.testing.assert_array_equal(axes[0, 0].images[0].get_array(), image)  # first column: the clean image
    np.testing.assert_array_equal(axes[1, 2].images[0].get_array(), corrupt(image, "gamma", 5, 3))
    path = save_figure(fig, tmp_path / "grid.png", dpi=80, colors=32)
    plt.close(fig)
    with Image.open(path) as png:
        assert png.mode == "P" and len(png.getcolors()) <= 32


def test_severity_curves_plot_the_table():
    import matplotlib.pyplot as plt

    fig = plot_severity_curves(_frame(), models=["A", "B"], percent=False)
    table = severity_table(_frame())
    for ax, metric in zip(fig.axes, ("cls_accuracy", "seg_miou")):
        assert [line.get_label() for line in ax.lines] == ["A", "B"]
        for line, model in zip(ax.lines, ("A", "B")):
            np.testing.assert_allclose(line.get_ydata(), table[column_name(metric, model)])
    plt.close(fig)


def test_benchmark_shape():
    image = np.full((32, 32, 3), 128, np.uint8)
    bench = benchmark_corruptions(image, names=("gamma", "contrast"), severities=(1,), repeats=1)
    assert bench["corruption"].tolist() == ["gamma", "contrast"] and (bench["seconds_per_image"] > 0).all()


# --------------------------------------------------------------------------------------------- evaluation

SIZE, NAMES, SEVERITIES = 56, ("gaussian_noise", "elastic_transform"), (1, 3)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("rob") / "syn", "mtlesd", seed=0, n_train=12, n_test=6,
                          image_size=SIZE)


class Constant(torch.nn.Module):
    """Always activity 0 and class 0 (background), whatever the image: its scores depend on the truth only."""

    tasks = ("cls", "seg")

    def __init__(self):
        super().__init__()
        self.register_buffer("marker", torch.zeros(1))

    def forward(self, x):
        cls = torch.zeros(x.shape[0], 3)
        seg = torch.zeros(x.shape[0], 7, *x.shape[-2:])
        cls[:, 0] = seg[:, 0] = 1.0
        return {"cls": cls, "seg": seg}


class TinyNet(torch.nn.Module):
    """A tiny random model that looks at the image: 1x1 convolutions for the pixels, pooled features for the
    activity (a fast stand-in for a network; the run-folder test below uses a real trained tiny ViT)."""

    tasks = ("cls", "seg")

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.seg = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 7, 1))
        self.cls = torch.nn.Linear(3, 3)
        self.pretrained_random_init = True

    def forward(self, x):
        return {"cls": self.cls(x.mean((2, 3))), "seg": self.seg(x)}


def _background_fraction(cell: Path) -> float:
    masks = [np.asarray(Image.open(p)) for p in sorted(cell.glob("test/*/mask/*.png"))]
    return float(np.mean(np.concatenate([(m == 0).ravel() for m in masks])))


def test_frame_shape_labels_and_cache(tiny_root, tmp_path, monkeypatch):
    model = TinyNet()
    kw = dict(dataset="mtlesd", image_size=SIZE, names=NAMES, severities=SEVERITIES, workers=1, progress=False,
              model_name="tiny")
    frame = evaluate_corruptions(model, tiny_root, tmp_path, **kw)
    assert len(frame) == 1 + len(NAMES) * len(SEVERITIES)
    assert frame[["corruption", "severity", "group"]].values.tolist() == [
        ["clean", 0, "clean"], ["gaussian_noise", 1, "noise"], ["gaussian_noise", 3, "noise"],
        ["elastic_transform", 1, "digital"], ["elastic_transform", 3, "digital"]]
    assert (frame["data"] == "synthetic").all() and frame["random_init_backbone"].all()
    assert not frame["synthetic_pretrained_backbone"].any()
    model.weights = {"name": "synthdino_vit_mini14", "sha256": "0" * 64}  # the bundled stand-in is labelled
    relabelled = evaluate_corruptions(model, tiny_root, tmp_path, **kw)
    assert relabelled["synthetic_pretrained_backbone"].all() and relabelled["cached"].all()
    del model.weights
    assert (frame["model"] == "tiny").all() and (frame["n_images"] == 6).all() and not frame["cached"].any()
    for column in ("cls_accuracy", "cls_macro_f1", "cls_compat_ac", "seg_miou", "seg_miou_fg", "seg_dice",
                   "seg_compat_miou"):
        assert frame[column].between(0, 1).all(), column
    assert not any("hd" in c or "ssim" in c for c in frame.columns)  # distances=False: not computed, not shown
    from endoarss_lib.experiments.results import ROW_FIELDS

    assert set(ROW_FIELDS) <= set(frame) and (frame["source"] == "robustness").all()  # the one row schema
    assert (frame["torch_version"] == torch.__version__).all() and (frame["seed"] == 0).all()
    files = sorted((tmp_path / "evals").rglob("*.json"))
    assert len(files) == len(frame)
    mtimes = [f.stat().st_mtime_ns for f in files]

    calls = []
    original = R._evaluate_cell
    monkeypatch.setattr(R, "_evaluate_cell", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    again = evaluate_corruptions(model, tiny_root, tmp_path, **kw)
    assert calls == [] and again["cached"].all()
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    pd.testing.assert_frame_equal(again.drop(columns="cached"), frame.drop(columns="cached"))

    # another corruption seed: corrupted cells again, the clean reference (seed-free) from the cache
    reseeded = evaluate_corruptions(model, tiny_root, tmp_path, seed=1, **kw)
    assert len(calls) == len(NAMES) * len(SEVERITIES)
    assert reseeded.set_index("corruption")["cached"].to_dict()["clean"]
    # other weights: another model key, everything evaluated again
    calls.clear()
    other = evaluate_corruptions(TinyNet(seed=1), tiny_root, tmp_path, **kw)
    assert len(calls) == len(frame) and other["model_key"].iloc[0] != frame["model_key"].iloc[0]


def test_scores_against_the_cells_own_masks(tiny_root, tmp_path):
    names = ("elastic_transform", "gamma", "smoke")
    frame = evaluate_corruptions(Constant(), tiny_root, tmp_path, dataset="mtlesd", image_size=SIZE, names=names,
                                 severities=(5,), workers=1, progress=False).set_index("corruption")
    cells = tmp_path / "corrupted" / f"{SIZE}x{SIZE}"
    clean_fraction = _background_fraction(cells / "clean" / "0")
    assert frame.loc["clean", "seg_pixel_acc"] == pytest.approx(clean_fraction, abs=1e-12)
    # photometric: same truth, same (image-blind) predictions -> exactly the clean metrics
    metrics = [c for c in frame.columns if c.startswith(("cls_", "seg_"))]
    for name in ("gamma", "smoke"):
        pd.testing.assert_series_equal(frame.loc[name, metrics], frame.loc["clean", metrics], check_names=False)
    # geometric: scored against the warped masks written in the cell, not the clean ones
    warped = _background_fraction(cells / "elastic_transform" / "5")
    assert warped != clean_fraction
    assert frame.loc["elastic_transform", "seg_pixel_acc"] == pytest.approx(warped, abs=1e-12)
    assert frame.loc["clean", "cls_accuracy"] == pytest.approx(2 / 6)  # activity 0 on 2 of the 6 test images


def test_run_folder_clean_row_matches_fit(tiny_root, tmp_path):
    cfg = preset("smoke", dataset="mtlesd", data_root=str(tiny_root), synthetic=False, image_size=SIZE, epochs=1,
                 device="cpu", out_dir=str(tmp_path / "runs"), progress=False)
    row = fit(cfg)
    frame = evaluate_corruptions(row["run_dir"], tiny_root, tmp_path / "rob", names="gamma", severities=2,
                                 workers=1, progress=False)
    assert frame["model"].tolist() == [Path(row["run_dir"]).name] * 2
    assert (frame["image_size"] == SIZE).all() and frame["model_key"].iloc[0] == model_key(row["run_dir"])
    clean = frame.iloc[0]
    # the clean cell (same bytes at the training size) and fit's test evaluation score the same predictions
    for metric in ("cls_accuracy", "cls_macro_f1", "seg_miou", "seg_miou_fg", "seg_dice", "seg_compat_miou"):
        assert clean[metric] == pytest.approx(row[f"test_{metric}"], abs=1e-12), metric


@pytest.mark.parametrize("kwargs, match", [
    (dict(names=("fog",)), r"names: unknown corruption\(s\) \['fog'\]"),
    (dict(names=()), "names: expected at least one"),
    (dict(names=("gamma", "gamma")), "listed twice"),
    (dict(severities=(0,)), r"severities: \[0\] not in 1..5"),
    (dict(severities=(6,)), r"severities: \[6\] not in 1..5"),
    (dict(workers=0), "workers=0: expected an integer >= 1"),
    (dict(seed=-1), "seed=-1"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(amp="fp8"), "amp='fp8'"),
    (dict(image_size=16), "image_size=16: expected an integer >= 32"),
    (dict(image_size=None), "dataset and image_size are required"),
])
def test_evaluate_errors(tiny_root, tmp_path, kwargs, match):
    args = dict(dataset="mtlesd", image_size=SIZE, names=("gamma",), severities=(1,), workers=1, progress=False)
    with pytest.raises(ValueError, match=match):
        evaluate_corruptions(Constant(), tiny_root, tmp_path, **{**args, **kwargs})


def test_evaluate_model_and_root_errors(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="model: expected a run folder"):
        evaluate_corruptions(42, tiny_root, tmp_path)
    with pytest.raises(ValueError, match="not a run folder"):
        evaluate_corruptions(tmp_path, tiny_root, tmp_path)
    with pytest.raises(ValueError, match="data_root=.*no test split"):
        evaluate_corruptions(Constant(), tmp_path / "nowhere", tmp_path, dataset="mtlesd", image_size=SIZE)


def test_corruptions_constant_matches_library():
    assert set(GROUP_OF) == set(CORRUPTIONS)


def test_pooled_outcomes_per_image_sum_the_cells(tiny_root, tmp_path):
    """The outcomes pooled over corrupted cells give the cells' pooled metrics: accuracy = the mean of the cells'
    accuracies (same images per cell), mIoU = that of the summed confusion; severity keys pool one severity."""
    from endoarss_lib.evidence.outcomes import outcome_value

    names, severities = ["gamma", "contrast"], [1, 3]
    outcomes = {}
    frame = evaluate_corruptions(TinyNet(), tiny_root, tmp_path, dataset="mtlesd", image_size=SIZE, names=names,
                                 severities=severities, workers=1, progress=False, outcomes=outcomes)
    corrupted = frame[frame["severity"] > 0]
    assert set(outcomes) == {0, 1, 3, "all"}
    assert outcome_value(outcomes["all"], "cls_accuracy") == pytest.approx(corrupted["cls_accuracy"].mean())
    assert outcome_value(outcomes[0], "cls_accuracy") == pytest.approx(
        frame.loc[frame["severity"] == 0, "cls_accuracy"].item())
    n = int(frame["n_images"].iloc[0])
    assert outcomes["all"]["seg_confusion"].shape[0] == n
    assert outcomes["all"]["seg_confusion"].sum() == len(corrupted) * outcomes[0]["seg_confusion"].sum()
    for severity in severities:
        at = corrupted[corrupted["severity"] == severity]
        assert outcome_value(outcomes[severity], "cls_accuracy") == pytest.approx(at["cls_accuracy"].mean())
    again = {}
    evaluate_corruptions(TinyNet(), tiny_root, tmp_path, dataset="mtlesd", image_size=SIZE, names=names,
                         severities=severities, workers=1, progress=False, outcomes=again)  # from the cache
    assert np.array_equal(again["all"]["seg_confusion"], outcomes["all"]["seg_confusion"])
