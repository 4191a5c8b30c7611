"""Tests of endoarss_lib.metrics against independent references (scikit-learn, SciPy, scikit-image, NumPy) and
hand-made closed-form cases."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, generate_binary_structure
from scipy.spatial.distance import cdist, directed_hausdorff
from skimage.draw import disk, rectangle
from skimage.metrics import hausdorff_distance, structural_similarity
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, jaccard_score,
                             precision_recall_fscore_support)

from endoarss_lib.metrics import (ClassificationMeter, SegmentationMeter, classification_metrics, delta_m,
                                  delta_m_flat, segmentation_metrics)

CROSS = generate_binary_structure(2, 1)


# ---------------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------------

def ref_boundary(mask):
    """Boundary by morphological erosion (the medpy / MONAI definition), independent of the module's code."""
    return mask & ~binary_erosion(mask, structure=CROSS, border_value=0)


def ref_hd_pair(pred_mask, true_mask):
    """(HD, HD95) from all boundary point pairs: scipy directed_hausdorff, cdist + np.percentile."""
    a, b = np.argwhere(ref_boundary(pred_mask)), np.argwhere(ref_boundary(true_mask))
    hd = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
    d = cdist(a, b)
    hd95 = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    return hd, hd95


def ref_confusion(t, p, k):
    return np.bincount(t.ravel() * k + p.ravel(), minlength=k * k).reshape(k, k)


def ref_onehot_ssim_image(p, t, k):
    present = [c for c in range(k) if (t == c).any()]
    return np.mean([structural_similarity((t == c).astype(float), (p == c).astype(float), data_range=1.0)
                    for c in present])


def random_blobs(rng, shape=(40, 48), k=4, n_blobs=5):
    img = np.zeros(shape, np.int64)
    for _ in range(n_blobs):
        c = rng.integers(1, k)
        if rng.random() < 0.5:
            rr, cc = disk((rng.integers(0, shape[0]), rng.integers(0, shape[1])), rng.integers(3, 12), shape=shape)
        else:
            start = (rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4))
            rr, cc = rectangle(start, extent=(rng.integers(3, 15), rng.integers(3, 15)), shape=shape)
        img[rr, cc] = c
    return img


def square(shape=(64, 64), top=20, left=20, side=16, value=1):
    img = np.zeros(shape, np.int64)
    img[top:top + side, left:left + side] = value
    return img


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k, n = 5, 300
    y_true = rng.integers(0, k, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, n))
    r = classification_metrics(y_true, y_pred, k)
    assert r["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert r["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert r["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"), abs=1e-12)
    np.testing.assert_array_equal(r["confusion"], confusion_matrix(y_true, y_pred, labels=range(k)))
    p, rc, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(k), zero_division=np.nan)
    np.testing.assert_allclose(r["per_class"]["precision"], p, atol=1e-12)
    np.testing.assert_allclose(r["per_class"]["recall"], rc, atol=1e-12)
    np.testing.assert_allclose(r["per_class"]["f1"], f, atol=1e-12)
    np.testing.assert_array_equal(r["per_class"]["support"], s)
    assert r["absent_classes"] == []


def test_classification_compat_formulas():
    rng = np.random.default_rng(3)
    k, n = 4, 200
    y_true = rng.integers(0, k, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, k - 1, n))
    cm = confusion_matrix(y_true, y_pred, labels=range(k)).astype(float)
    tp, fp, fn = np.diag(cm), cm.sum(0) - np.diag(cm), cm.sum(1) - np.diag(cm)
    prec, rec = tp / (tp + fp + 1e-3), tp / (tp + fn + 1e-3)
    r = classification_metrics(y_true, y_pred, k)
    # the released "Acc": Pixel_Accuracy_Class().mean() = mean of tp / (column sum + 1e-8) (LibMTL/eva.py)
    assert r["compat_ac"] == pytest.approx(np.mean(tp / (cm.sum(0) + 1e-8)), abs=1e-12)
    assert r["compat_f1"] == pytest.approx(np.mean(2 * prec * rec / (prec + rec + 1e-3)), abs=1e-12)
    # compat "Acc" is macro precision (not accuracy): close to sklearn's macro precision with zeros for 0/0
    ref_prec = precision_recall_fscore_support(y_true, y_pred, labels=range(k), average="macro", zero_division=0)[0]
    assert r["compat_ac"] == pytest.approx(ref_prec, abs=1e-3)


def test_classification_perfect():
    y = np.repeat(np.arange(3), 1000)
    r = classification_metrics(y, y, 3)
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0 and r["weighted_f1"] == 1.0
    assert r["compat_f1"] == pytest.approx(0.9995, abs=1e-6)  # the paper's 99.95 for a perfect classifier
    assert r["compat_ac"] == pytest.approx(1.0, abs=1e-10)  # its 1e-8 epsilon, not the F-score's 1e-3


def test_classification_absent_class_excluded():
    y_true = np.array([0, 1, 2, 0, 1, 2, 0])
    y_pred = np.array([0, 1, 1, 0, 2, 2, 1])
    r = classification_metrics(y_true, y_pred, 5)  # classes 3 and 4 never occur
    assert r["absent_classes"] == [3, 4]
    assert r["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2]), abs=1e-12)
    assert np.isnan(r["per_class"]["f1"][3])
    # the compat means run over ALL classes, absent ones scoring 0
    cm = ref_confusion(y_true, y_pred, 5).astype(float)
    tp = np.diag(cm)
    assert r["compat_ac"] == pytest.approx(np.mean(tp / (cm.sum(0) + 1e-8)), abs=1e-12)


def test_classification_class_never_predicted_counts_in_macro():
    y_true, y_pred = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 1])
    r = classification_metrics(y_true, y_pred, 3)
    assert r["absent_classes"] == []
    assert r["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    assert np.isnan(r["per_class"]["precision"][2])  # never predicted: precision undefined, not 0


def test_classification_logits_torch_and_meter_batches():
    rng = np.random.default_rng(4)
    k, n = 6, 120
    logits = torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32))
    y_true = torch.from_numpy(rng.integers(0, k, n))
    whole = classification_metrics(y_true, logits, k)
    ref_pred = logits.argmax(1).numpy()
    assert whole["accuracy"] == pytest.approx(accuracy_score(y_true.numpy(), ref_pred), abs=1e-12)
    meter = ClassificationMeter(k)
    for lo in range(0, n, 25):
        meter.update(logits[lo:lo + 25], y_true[lo:lo + 25])
    batched = meter.compute()
    np.testing.assert_array_equal(batched["confusion"], whole["confusion"])
    for key in ("accuracy", "macro_f1", "weighted_f1", "compat_ac", "compat_f1"):
        assert batched[key] == whole[key]
    meter.reset()
    assert meter.compute()["num_samples"] == 0


def test_classification_single_sample_and_lists():
    meter = ClassificationMeter(3)
    meter.update(2, 2)
    meter.update(np.array([0.1, 0.7, 0.2]), 1)  # scores of one sample
    meter.update([0, 0], [0, 1])
    r = meter.compute()
    assert r["num_samples"] == 4 and r["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("args, match", [
    ((np.array([0, 1]), np.array([0, 1, 1]), 3), "pred"),
    ((np.array([0, 3]), np.array([0, 1]), 3), "target"),
    ((np.array([0, 1]), np.array([0, -1]), 3), "pred"),
    ((np.array([0, 1]), np.array([0, 1]), 1), "num_classes"),
    ((np.zeros((2, 2), int), np.zeros((2, 2), int), 3), "target"),
    ((np.array([0, 1]), np.zeros((2, 4)), 3), "class axis"),
    ((np.array([0, 1]), np.array([0.5, 1.0]), 3), "pred"),
    ((np.array([0, 1]), np.array([[0.5, np.nan, 0.0], [1.0, 0.0, 0.0]]), 3), "pred scores"),
    ((torch.tensor([0, 1]), torch.tensor([[0.5, float("inf"), 0.0], [1.0, 0.0, 0.0]]), 3), "pred scores"),
])
def test_classification_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(*args)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: confusion-matrix metrics
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_segmentation_confusion_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 4
    target = np.stack([random_blobs(rng, k=k) for _ in range(3)])
    pred = np.stack([random_blobs(rng, k=k) for _ in range(3)])
    r = segmentation_metrics(pred, target, k)
    t, p = target.ravel(), pred.ravel()
    np.testing.assert_array_equal(r["confusion"], ref_confusion(t, p, k))
    iou = jaccard_score(t, p, labels=range(k), average=None)
    dice = f1_score(t, p, labels=range(k), average=None)
    np.testing.assert_allclose(r["iou_per_class"], iou, atol=1e-12)
    np.testing.assert_allclose(r["dice_per_class"], dice, atol=1e-12)
    assert r["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert r["miou_fg"] == pytest.approx(iou[1:].mean(), abs=1e-12)
    assert r["dice"] == pytest.approx(dice.mean(), abs=1e-12)
    assert r["dice_fg"] == pytest.approx(dice[1:].mean(), abs=1e-12)
    assert r["pixel_acc"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    cm = ref_confusion(t, p, k).astype(float)
    tp, fp, fn = np.diag(cm), cm.sum(0) - np.diag(cm), cm.sum(1) - np.diag(cm)
    assert r["compat_miou"] == pytest.approx(np.mean(tp / (tp + fp + fn + 1e-3)), abs=1e-12)
    assert r["compat_dice"] == pytest.approx(np.mean(2 * tp / (2 * tp + fp + fn + 1e-3)), abs=1e-12)


def test_segmentation_whole_set_not_mean_of_images():
    # image 1: class 1 perfect and large; image 2: class 1 tiny and missed -> whole-set IoU != mean of per-image IoU
    t1, t2 = square(side=30), square(side=2)
    p1, p2 = t1.copy(), np.zeros_like(t2)
    r = segmentation_metrics(np.stack([p1, p2]), np.stack([t1, t2]), 2, compute_ssim=False)
    assert r["iou_per_class"][1] == pytest.approx(900 / 904)


def test_segmentation_absent_class_excluded_and_reported():
    rng = np.random.default_rng(5)
    target = random_blobs(rng, k=3)
    pred = random_blobs(rng, k=3)
    r = segmentation_metrics(pred, target, 5)  # classes 3, 4 appear nowhere
    assert r["absent_classes"] == [3, 4]
    iou = jaccard_score(target.ravel(), pred.ravel(), labels=[0, 1, 2], average=None)
    assert r["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert np.isnan(r["iou_per_class"][3]) and np.isnan(r["dice_per_class"][4])
    # compat: mean over all 5 classes, the absent two scoring 0
    assert r["compat_miou"] == pytest.approx(iou.sum() / 5, abs=1e-4)


def test_segmentation_perfect_prediction():
    rng = np.random.default_rng(6)
    target = np.stack([random_blobs(rng) for _ in range(2)])
    r = segmentation_metrics(target.copy(), target, 4)
    assert r["miou"] == 1.0 and r["dice"] == 1.0 and r["miou_fg"] == 1.0 and r["pixel_acc"] == 1.0
    assert r["hd"] == 0.0 and r["hd95"] == 0.0 and r["hd_one_sided"] == 0
    assert r["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert r["compat_hd"] == 0.0 and r["compat_ssim"] == pytest.approx(1.0, abs=1e-12)


def test_ignore_index_excluded():
    rng = np.random.default_rng(7)
    k = 4
    target = np.stack([random_blobs(rng, k=k) for _ in range(2)])
    pred = np.stack([random_blobs(rng, k=k) for _ in range(2)])
    target[:, :5, :] = 255
    target[:, 20:23, 10:30] = 255
    r = segmentation_metrics(pred, target, k, ignore_index=255)
    valid = target != 255
    t, p = target[valid], pred[valid]
    np.testing.assert_array_equal(r["confusion"], ref_confusion(t, p, k))
    assert r["num_pixels"] == valid.sum()
    assert r["pixel_acc"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    assert r["miou"] == pytest.approx(jaccard_score(t, p, labels=range(k), average="macro"), abs=1e-12)
    # prediction changed only where the target is ignored -> nothing changes
    pred2 = pred.copy()
    pred2[~valid] = (pred2[~valid] + 1) % k
    r2 = segmentation_metrics(pred2, target, k, ignore_index=255)
    for key in ("miou", "dice", "pixel_acc", "compat_miou"):
        assert r2[key] == r[key]


def test_ignore_index_hausdorff_and_ssim_policy():
    # ignored pixels belong to no class in either map: HD and SSIM are those of masks with the pixels removed
    target = square(side=20)
    pred = np.roll(target, 3, axis=1)
    target_ign = target.copy()
    target_ign[:, :25] = 255
    r = segmentation_metrics(pred, target_ign, 2, ignore_index=255)
    valid = target_ign != 255
    hd, hd95 = ref_hd_pair((pred == 1) & valid, (target == 1) & valid)
    assert r["hd"] == pytest.approx(hd) and r["hd95"] == pytest.approx(hd95)
    ssim_ref = np.mean([structural_similarity(((target == c) & valid).astype(float),
                                              ((pred == c) & valid).astype(float), data_range=1.0)
                        for c in (0, 1)])
    assert r["ssim"] == pytest.approx(ssim_ref, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: Hausdorff
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift, axis", [(1, 0), (3, 1), (7, 0), (10, 1)])
def test_shifted_square_hd_equals_shift(shift, axis):
    target = square(side=24)
    pred = np.roll(target, shift, axis=axis)
    r = segmentation_metrics(pred, target, 2)
    assert r["hd"] == shift
    assert r["hd95"] == pytest.approx(ref_hd_pair(pred == 1, target == 1)[1])
    assert r["hd_pairs"] == 1 and r["hd_one_sided"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd_matches_point_set_references(seed):
    rng = np.random.default_rng(seed + 10)
    k = 4
    target = np.stack([random_blobs(rng, k=k) for _ in range(3)])
    pred = np.stack([random_blobs(rng, k=k) for _ in range(3)])
    hds, hd95s, one_sided = [], [], 0
    for p, t in zip(pred, target):
        for c in range(1, k):
            pm, tm = p == c, t == c
            if pm.any() and tm.any():
                hd, hd95 = ref_hd_pair(pm, tm)
                assert hd == pytest.approx(hausdorff_distance(ref_boundary(pm), ref_boundary(tm)))
                hds.append(hd)
                hd95s.append(hd95)
            elif pm.any() or tm.any():
                one_sided += 1
    r = segmentation_metrics(pred, target, k)
    assert r["hd_pairs"] == len(hds) and r["hd_one_sided"] == one_sided
    assert r["hd"] == pytest.approx(np.mean(hds), abs=1e-9)
    assert r["hd95"] == pytest.approx(np.mean(hd95s), abs=1e-9)
    assert r["hd_one_sided_rate"] == pytest.approx(one_sided / (len(hds) + one_sided))


def test_hd_background_skipped_by_default_and_selectable():
    target = square(side=20)
    pred = np.roll(target, 4, axis=0)
    assert segmentation_metrics(pred, target, 2)["hd_classes"] == [1]
    r = segmentation_metrics(pred, target, 2, hd_classes=[0, 1])
    assert r["hd_pairs"] == 2
    hd0 = ref_hd_pair(pred == 0, target == 0)[0]
    assert r["hd_per_class"][0] == pytest.approx(hd0) and r["hd_per_class"][1] == 4
    assert r["hd"] == pytest.approx((hd0 + 4) / 2)


def test_empty_prediction_is_one_sided_not_a_distance():
    target = square(side=10)
    pred = np.zeros_like(target)
    r = segmentation_metrics(pred, target, 2)
    assert np.isnan(r["hd"]) and np.isnan(r["hd95"])
    assert r["hd_pairs"] == 0 and r["hd_target_only"] == 1 and r["hd_pred_only"] == 0
    assert r["hd_one_sided_rate"] == 1.0
    assert r["iou_per_class"][1] == 0.0
    # a false positive class is counted on the other side, and a real pair keeps its distance
    pred2 = np.stack([square(side=10, value=2), square(side=10)])
    target2 = np.stack([square(side=10), np.roll(square(side=10), 2, axis=1)])
    r2 = segmentation_metrics(pred2, target2, 3)
    assert r2["hd_pred_only"] == 1 and r2["hd_target_only"] == 1 and r2["hd_pairs"] == 1
    assert r2["hd"] == 2.0 and r2["hd_one_sided_rate"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: SSIM
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_skimage_per_class(seed):
    rng = np.random.default_rng(seed + 20)
    k = 4
    target = np.stack([random_blobs(rng, k=k) for _ in range(3)])
    pred = np.stack([random_blobs(rng, k=k) for _ in range(3)])
    ref = np.mean([ref_onehot_ssim_image(p, t, k) for p, t in zip(pred, target)])
    r = segmentation_metrics(pred, target, k)
    assert r["ssim"] == pytest.approx(ref, abs=1e-12)
    assert r["ssim_images"] == 3


def test_ssim_averages_over_classes_present_in_truth_only():
    target = square(side=20)  # classes 0 and 1 present; class 2 only predicted
    pred = target.copy()
    pred[0:10, 0:10] = 2
    ref = np.mean([structural_similarity((target == c).astype(float), (pred == c).astype(float), data_range=1.0)
                   for c in (0, 1)])
    assert segmentation_metrics(pred, target, 3)["ssim"] == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Paper-compatible HD / SSIM
# ---------------------------------------------------------------------------------------------------------------

def test_compat_hd_row_points_formula():
    rng = np.random.default_rng(9)
    target = np.stack([random_blobs(rng) for _ in range(3)])
    pred = np.stack([random_blobs(rng) for _ in range(3)])
    ref = np.mean([max(directed_hausdorff(t, p)[0], directed_hausdorff(p, t)[0]) for p, t in zip(pred, target)])
    r = segmentation_metrics(pred, target, 4)
    assert r["compat_hd"] == pytest.approx(ref, abs=1e-12) and r["compat_hd_images"] == 3


def test_compat_hd_misses_a_vertical_shift():
    # rows are the points: shifting a tall blob vertically keeps the same set of rows -> compat HD 0, true HD 10
    target = np.zeros((64, 64), np.int64)
    target[10:40, 20:30] = 1
    pred = np.roll(target, 10, axis=0)
    r = segmentation_metrics(pred, target, 2)
    assert r["compat_hd"] == 0.0
    assert r["hd"] == 10.0


def test_compat_ssim_formula_and_constant_prediction_skipped():
    rng = np.random.default_rng(11)
    target = np.stack([random_blobs(rng) for _ in range(3)])
    pred = np.stack([random_blobs(rng) for _ in range(3)])
    pred[1] = 0  # constant prediction: data_range 0 -> NaN in the released code, dropped
    ref = [structural_similarity(t.astype(np.uint8), p.astype(np.uint8), data_range=int(p.max()) - int(p.min()))
           for i, (p, t) in enumerate(zip(pred, target)) if i != 1]
    r = segmentation_metrics(pred, target, 4)
    assert r["compat_ssim"] == pytest.approx(np.mean(ref), abs=1e-12)
    assert r["compat_ssim_skipped"] == 1 and r["compat_ssim_images"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: meter, input forms, errors
# ---------------------------------------------------------------------------------------------------------------

def _assert_same_results(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(value, b[key], rtol=1e-12, atol=1e-12)
        elif isinstance(value, float):
            assert value == pytest.approx(b[key], rel=1e-12, abs=1e-12, nan_ok=True), key
        else:
            assert value == b[key], key


def test_meter_batches_equal_one_call():
    rng = np.random.default_rng(12)
    k = 4
    target = np.stack([random_blobs(rng, k=k) for _ in range(5)])
    pred = np.stack([random_blobs(rng, k=k) for _ in range(5)])
    target[0, :4] = 255
    whole = segmentation_metrics(pred, target, k, ignore_index=255)
    meter = SegmentationMeter(k, ignore_index=255)
    meter.update(pred[:2], target[:2])
    meter.update(pred[2], target[2])  # a single (H, W) image
    meter.update(pred[3:], target[3:])
    _assert_same_results(meter.compute(), whole)
    meter.reset()
    assert meter.compute()["num_images"] == 0


def test_logits_torch_and_single_image_inputs():
    rng = np.random.default_rng(13)
    k = 3
    target = np.stack([random_blobs(rng, k=k) for _ in range(2)])
    logits = torch.from_numpy(rng.normal(size=(2, k, 40, 48)))
    labels = logits.argmax(1).numpy()
    from_logits = segmentation_metrics(logits, torch.from_numpy(target), k)
    from_labels = segmentation_metrics(labels, target, k)
    _assert_same_results(from_logits, from_labels)
    single = segmentation_metrics(logits[0], target[0], k)  # (S, H, W) scores with an (H, W) target
    _assert_same_results(single, segmentation_metrics(labels[0], target[0], k))
    assert single["num_images"] == 1 and single["resolutions"] == [(40, 48)]


def test_compute_switches():
    target = square(side=20)
    r = segmentation_metrics(np.roll(target, 2, 1), target, 2, compute_distances=False, compute_ssim=False)
    assert np.isnan(r["hd"]) and np.isnan(r["compat_hd"]) and np.isnan(r["ssim"]) and np.isnan(r["compat_ssim"])
    assert r["hd_pairs"] == 0 and r["miou"] < 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(pred=np.zeros((2, 8, 8), int), target=np.zeros((2, 8, 9), int), num_classes=2), "pred"),
    (dict(pred=np.zeros((8, 8), int), target=np.full((8, 8), 2), num_classes=2), "target"),
    (dict(pred=np.full((8, 8), 5), target=np.zeros((8, 8), int), num_classes=2), "pred"),
    (dict(pred=np.zeros((8, 8), int), target=np.full((8, 8), 255), num_classes=2), "ignore_index"),
    (dict(pred=np.zeros((8, 8), int), target=np.zeros((8, 8), int), num_classes=1), "num_classes"),
    (dict(pred=np.zeros(8, int), target=np.zeros(8, int), num_classes=2), "target"),
    (dict(pred=np.zeros((1, 1, 8, 8), int), target=np.zeros((1, 1, 8, 8), int), num_classes=2), "target"),
    (dict(pred=np.zeros((1, 3, 8, 8)), target=np.zeros((1, 8, 8), int), num_classes=2), "class axis"),
    (dict(pred=np.zeros((5, 5), int), target=np.zeros((5, 5), int), num_classes=2), "compute_ssim"),
    (dict(pred=np.zeros((8, 8), int), target=np.zeros((8, 8), int), num_classes=2, hd_classes=[2]),
     "hd_classes"),
    (dict(pred=np.zeros((8, 8), int), target=np.zeros((8, 8), int), num_classes=2, ignore_index="x"),
     "ignore_index"),
    (dict(pred=np.full((8, 8), 0.5), target=np.zeros((8, 8), int), num_classes=2), "pred"),
])
def test_segmentation_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        segmentation_metrics(**kwargs)


def test_ignore_index_allows_out_of_range_target_only_for_it():
    target = np.zeros((8, 8), int)
    target[0, 0] = 255
    r = segmentation_metrics(np.zeros((8, 8), int), target, 2, ignore_index=255)
    assert r["num_pixels"] == 63
    target[0, 1] = 7
    with pytest.raises(ValueError, match="target"):
        segmentation_metrics(np.zeros((8, 8), int), target, 2, ignore_index=255)


# ---------------------------------------------------------------------------------------------------------------
# delta_m
# ---------------------------------------------------------------------------------------------------------------

def test_delta_m_libmtl_convention():
    # LibMTL's count_improvement averages within each task, then over tasks. Its docstring's example, by hand:
    # task A: (93 - 96) / 96 (higher better) and -(99 - 98) / 98 (lower better); task B: (0.5 - 0.2) / 0.2.
    base = {"A_m1": 96.0, "A_m2": 98.0, "B_m1": 0.2}
    new = {"A_m1": 93.0, "A_m2": 99.0, "B_m1": 0.5}
    higher = {"A_m1": True, "A_m2": False, "B_m1": True}
    expected = (((93 - 96) / 96 + (98 - 99) / 98) / 2 + (0.5 - 0.2) / 0.2) / 2
    assert delta_m(new, base, higher) == pytest.approx(expected)
    assert delta_m(base, base, higher) == 0.0
    # the example: activity +2 % (two metrics), segmentation -1 % (three): +0.5 % per task, +0.2 % flat
    single = {"cls_accuracy": 0.5, "cls_macro_f1": 0.5, "seg_miou": 0.5, "seg_dice": 0.5, "seg_ssim": 0.5}
    mtl = {"cls_accuracy": 0.51, "cls_macro_f1": 0.51, "seg_miou": 0.495, "seg_dice": 0.495, "seg_ssim": 0.495}
    higher = dict.fromkeys(single, True)
    assert delta_m(mtl, single, higher) == pytest.approx(0.005)
    assert delta_m_flat(mtl, single, higher) == pytest.approx(0.002)
    # the task comes from the result key's prefix (test_ included) or an explicit map; lower-is-better flips the sign
    assert delta_m({"test_seg_hd95": 8.0}, {"test_seg_hd95": 10.0}, {"test_seg_hd95": False}) == pytest.approx(0.2)
    assert delta_m({"acc": 0.9, "hd": 8.0}, {"acc": 0.8, "hd": 10.0}, {"acc": True, "hd": False},
                   tasks={"acc": "cls", "hd": "seg"}) == pytest.approx((0.125 + 0.2) / 2)
    with pytest.raises(ValueError, match="no <task>_ prefix"):
        delta_m({"acc": 0.9}, {"acc": 0.8}, {"acc": True})


@pytest.mark.parametrize("mtl, single, higher, match", [
    ({"cls_acc": 0.9}, {"cls_acc": 0.8}, {}, "higher_is_better"),
    ({}, {"cls_acc": 0.8}, {"cls_acc": True}, "mtl"),
    ({"cls_acc": 0.9}, {}, {"cls_acc": True}, "single"),
    ({"cls_acc": 0.9}, {"cls_acc": 0.0}, {"cls_acc": True}, "single"),
    ({"cls_acc": float("nan")}, {"cls_acc": 0.5}, {"cls_acc": True}, "mtl"),
])
def test_delta_m_bad_input(mtl, single, higher, match):
    with pytest.raises(ValueError, match=match):
        delta_m(mtl, single, higher)


# ---------------------------------------------------------------------------------------------------------------
# Multi-label presence: average precision and macro F1 against scikit-learn
# ---------------------------------------------------------------------------------------------------------------

def test_multilabel_ap_map_and_f1_match_sklearn():
    from sklearn.metrics import average_precision_score

    from endoarss_lib.metrics import MultiLabelMeter

    rng = np.random.default_rng(3)
    n, c = 60, 5
    target = rng.random((n, c)) < [0.1, 0.3, 0.5, 0.8, 0.0]  # class 4 never present
    scores = np.clip(target * 0.35 + rng.random((n, c)) * 0.7, 0, 1).round(2)  # rounding makes ties
    meter = MultiLabelMeter(c)
    for start in range(0, n, 7):  # batches of 7: accumulation must not depend on batching
        meter.update(torch.from_numpy(scores[start:start + 7]), torch.from_numpy(target[start:start + 7]))
    out = meter.compute()
    expected_ap = [average_precision_score(target[:, k], scores[:, k]) for k in range(4)]
    np.testing.assert_allclose(out["ap_per_class"][:4], expected_ap, rtol=1e-12)
    assert np.isnan(out["ap_per_class"][4]) and out["absent_classes"] == [4]  # no positive: undefined, left out
    assert out["map"] == pytest.approx(np.mean(expected_ap))
    pred = scores >= 0.5
    f1 = f1_score(target, pred, average=None, zero_division=np.nan)
    np.testing.assert_allclose(out["f1_per_class"], f1, equal_nan=True)
    assert out["macro_f1"] == pytest.approx(np.nanmean(f1))
    # a constant score's AP is the class's prevalence: the chance mAP
    constant = [average_precision_score(target[:, k], np.full(n, 0.3)) for k in range(4)]
    assert out["chance_map"] == pytest.approx(np.mean(constant))
    assert out["predicted_sets"] == len({tuple(r) for r in pred})


def test_multilabel_closed_form_cases_and_bad_input():
    from endoarss_lib.metrics import MultiLabelMeter, average_precision

    # positives ranked 1st and 3rd of 4: AP = (1/2)(1/1) + (1/2)(2/3)
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(1 / 3)  # one threshold: the prevalence
    perfect = MultiLabelMeter(2)
    perfect.update(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[1, 0], [0, 1]]))
    assert perfect.compute()["map"] == 1.0 and perfect.compute()["macro_f1"] == 1.0
    with pytest.raises(ValueError, match="0/1"):
        MultiLabelMeter(2).update(np.zeros((1, 2)), np.array([[2, 0]]))
    with pytest.raises(ValueError, match=r"\(B, C=3\)"):
        MultiLabelMeter(3).update(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN"):
        MultiLabelMeter(1).update(np.array([[np.nan]]), np.array([[1]]))
