"""Gallery helpers: per-image IoU on hand-made masks, worst / confused picks, figure structure, small PNG copies."""
from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from endoarss_lib.experiments.viz import (confused_samples, confusion_pixels, pair_counts, per_image_iou, plot_gallery,
                                          save_figure, shrink_png, worst_samples)

SPEC = SimpleNamespace(seg_classes=("background", "needle", "knife", "bleb"), num_seg_classes=4,
                       activities=("marking", "injection"))
LABEL = "SYNTHETIC data (test)"


def sample(index, truth, pred, label=0, pred_label=None):
    out = {"index": index, "image": np.full(truth.shape + (3,), 90, np.uint8), "mask": truth, "pred_mask": pred,
           "label": label, "path": f"{index}.png"}
    if pred_label is not None:
        out["pred_label"] = pred_label
    return out


def masks():
    truth = np.zeros((6, 6), np.int64)
    truth[0, :4] = 1  # 4 needle pixels
    truth[5, :2] = 2  # 2 knife pixels
    return truth


def test_per_image_iou_closed_form():
    truth = masks()
    pred = truth.copy()
    pred[0, 2:4] = 0  # needle: 2 of 4 found -> IoU 1/2
    pred[3, 3] = 3  # a false bleb pixel -> IoU 0 for bleb
    assert per_image_iou(pred, truth, 4) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    background = (36 - 6 - 1) / (36 - 6 + 2)  # truth bg 30 px; predicted bg 30 - 1 + 2 = 31; overlap 29
    assert per_image_iou(pred, truth, 4, include_background=True) == pytest.approx(
        (background + 0.5 + 1.0 + 0.0) / 4)
    assert per_image_iou(truth, truth, 4) == 1.0
    assert math.isnan(per_image_iou(np.zeros((3, 3), int), np.zeros((3, 3), int), 4))


def test_per_image_iou_ignores_ignored_pixels():
    truth, pred = masks(), masks()
    truth[2, 2], pred[2, 2] = 255, 3  # a prediction on an ignored pixel counts for nothing
    assert per_image_iou(pred, truth, 4) == 1.0


def test_worst_samples_and_confusions_pick_the_known_cases():
    truth = masks()
    perfect = truth.copy()
    swapped = np.where(truth == 1, 2, truth)  # all needle pixels called knife
    half = truth.copy()
    half[0, :2] = 0
    samples = [sample(10, truth, perfect), sample(11, truth, swapped), sample(12, truth, half),
               sample(13, np.zeros_like(truth), np.zeros_like(truth))]  # nothing to find: NaN, never picked
    assert worst_samples(samples, 4, k=2) == [1, 2]
    assert worst_samples(samples, 4, k=10) == [1, 2, 0]
    assert [confusion_pixels(s, 1, 2) for s in samples] == [0, 4, 0, 0]
    reverse = sample(14, truth, np.where(truth == 2, 1, truth))  # the 2 knife pixels called needle
    assert confusion_pixels(reverse, 1, 2) == confusion_pixels(reverse, 2, 1) == 2
    assert confused_samples(samples + [reverse], 1, 2, k=5) == [1, 4]
    assert confused_samples([samples[0]], 1, 2) == []


def gallery_inputs():
    truth = masks()
    rows = [sample(i, truth, truth, label=i % 2, pred_label=0) for i in range(3)]
    seg_only = [{k: v for k, v in s.items() if k != "pred_label"} for s in rows]
    return {"seg only": seg_only, "MTL": rows}


def test_gallery_structure_legend_and_label():
    by_model = gallery_inputs()
    fig = plot_gallery(by_model, SPEC, positions=[2, 0], label=LABEL, title="Fig. 5 style", row_notes=["a", "b"])
    assert len(fig.axes) == 2 * (2 + 2)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"{k}: {n}" for k, n in enumerate(SPEC.seg_classes)]
    assert LABEL in fig._suptitle.get_text() and "Fig. 5 style" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("#2 marking") and titles[0].endswith("a")
    assert titles[2].startswith("seg only") and titles[3].startswith("MTL") and "fg IoU 1.00" in titles[3]
    wrong_activity = fig.axes[4 + 3]  # row 1 is sample 0 (label 0, predicted 0): black
    assert wrong_activity.title.get_color() == "black"
    plt.close(fig)
    fig = plot_gallery(by_model, SPEC, label=LABEL)
    assert len(fig.axes) == 3 * 4
    assert fig.axes[4 + 3].title.get_color() == "crimson"  # sample 1: label 1, predicted 0
    plt.close(fig)


def test_gallery_errors_name_the_argument():
    by_model = gallery_inputs()
    with pytest.raises(ValueError, match="samples_by_model"):
        plot_gallery({"a": by_model["MTL"], "b": by_model["MTL"][:2]}, SPEC, label=LABEL)
    with pytest.raises(ValueError, match="samples_by_model"):
        plot_gallery({}, SPEC, label=LABEL)
    with pytest.raises(ValueError, match="row_notes"):
        plot_gallery(by_model, SPEC, positions=[0], label=LABEL, row_notes=["a", "b"])
    with pytest.raises(ValueError, match="positions"):
        plot_gallery(by_model, SPEC, positions=[], label=LABEL)
    with pytest.raises(TypeError):
        plot_gallery(by_model, SPEC)  # the data label is required


def test_shrink_png_makes_a_small_palette_copy(tmp_path):
    fig = plot_gallery(gallery_inputs(), SPEC, label=LABEL)
    big = save_figure(fig, tmp_path / "big.png", dpi=150)
    plt.close(fig)
    small = shrink_png(big, tmp_path / "sub" / "small.png", max_side=300, colors=32)
    with Image.open(small) as image:
        assert max(image.size) <= 300 and image.mode == "P"
    assert small.stat().st_size < big.stat().st_size
    with pytest.raises(ValueError, match="colors"):
        shrink_png(big, tmp_path / "x.png", colors=1)


def test_pair_counts_closed_form():
    truth = masks()  # 4 needle + 2 knife pixels
    swapped = np.where(truth == 1, 2, truth)  # needle -> knife: 4 swapped, the 2 knife pixels right
    missed = np.zeros_like(truth)  # nothing found: nothing swapped either
    assert pair_counts([sample(0, truth, swapped)], 1, 2) == {"pair_pixels": 6, "found": 6, "right": 2,
                                                              "swapped": 4, "swapped_of_found": 4 / 6}
    assert pair_counts([sample(0, truth, missed), sample(1, truth, truth)], 1, 2) == {
        "pair_pixels": 12, "found": 6, "right": 6, "swapped": 0, "swapped_of_found": 0.0}
    nothing = pair_counts([sample(0, truth, missed)], 1, 2)  # nothing found: "0 swapped" is not "no confusion"
    assert nothing["found"] == 0 and nothing["swapped"] == 0 and np.isnan(nothing["swapped_of_found"])
