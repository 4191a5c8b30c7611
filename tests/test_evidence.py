"""Evidence: intervals and verdicts (against SciPy and closed forms), metrics from per-image outcomes (against
scikit-learn), claims as data, the patch-grid ceiling, scales."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, jaccard_score

from endoarss_lib.evidence import CLAIMS, SCALES, VARIANTS, Claim, decide, get_scale, sentence
from endoarss_lib.evidence.ceiling import activity_ceiling, patch_ceiling, patch_majority
from endoarss_lib.evidence.outcomes import outcome_value, swap_rate
from endoarss_lib.evidence.stats import bootstrap_interval, t_interval, verdict

CLASSES = ("background", "a", "b", "c")


# ------------------------------------------------------------------------------------------------------- stats
def test_t_interval_matches_scipy():
    values = [0.12, 0.05, 0.09, 0.11]
    mean, low, high = t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(ref)
    assert np.isnan(t_interval([0.3])[1])  # one seed: no interval


def test_bootstrap_interval_of_a_constant_difference_is_that_constant():
    low, high = bootstrap_interval(lambda ib, iw: 0.25, 10, 10, paired=True, n_boot=50)
    assert low == high == 0.25


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    x = np.random.default_rng(1).normal(0.3, 1.0, 400)
    low, high = bootstrap_interval(lambda ib, iw: x[ib].mean(), len(x), len(x), paired=True, n_boot=3000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.02) and high == pytest.approx(x.mean() + half, abs=0.02)


def test_bootstrap_pairs_the_same_images():
    seen = []
    bootstrap_interval(lambda ib, iw: seen.append(ib is iw) or 0.0, 5, 5, paired=True, n_boot=5)
    assert all(seen)
    seen.clear()
    bootstrap_interval(lambda ib, iw: seen.append(len(ib) == 5 and len(iw) == 7) or 0.0, 5, 7, paired=False,
                       n_boot=5)
    assert all(seen)
    with pytest.raises(ValueError):
        bootstrap_interval(lambda ib, iw: 0.0, 5, 7, paired=True)


@pytest.mark.parametrize("args, expected", [
    ((3, 0.01, 0.05, 0.02, 0.04), "demonstrated"),
    ((3, -0.05, -0.01, -0.04, -0.02), "reversed"),
    ((3, 0.01, 0.05, -0.01, 0.04), "inconclusive"),  # the test images do not agree
    ((3, -0.01, 0.05, 0.02, 0.04), "inconclusive"),  # the seeds do not agree
    ((1, 0.01, 0.05, 0.02, 0.04), "inconclusive"),  # one seed decides nothing
])
def test_verdict_rule(args, expected):
    assert verdict(*args) == expected


def test_verdict_on_seeds_alone():
    assert verdict(3, 0.01, 0.05, bootstrap=False) == "demonstrated"
    assert verdict(3, 0.01, 0.05) == "inconclusive"  # an image metric without its bootstrap is not decided


# ----------------------------------------------------------------------------------------------------- outcomes
def _outcomes(rng, n=30, k=3, s=4, size=12):
    true = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, k, n))
    masks = rng.integers(0, s, (n, size, size))
    preds = np.where(rng.random((n, size, size)) < 0.6, masks, rng.integers(0, s, (n, size, size)))
    conf = np.stack([np.bincount(m.ravel() * s + p.ravel(), minlength=s * s).reshape(s, s)
                     for m, p in zip(masks, preds)])
    return {"cls_true": true, "cls_pred": pred, "cls_prob": np.eye(k)[pred], "seg_confusion": conf,
            "path": np.array([f"{i}.png" for i in range(n)])}, masks, preds


def test_outcome_metrics_match_scikit_learn():
    arrays, masks, preds = _outcomes(np.random.default_rng(0))
    assert outcome_value(arrays, "cls_accuracy") == pytest.approx(accuracy_score(arrays["cls_true"],
                                                                                 arrays["cls_pred"]))
    assert outcome_value(arrays, "test_cls_macro_f1") == pytest.approx(
        f1_score(arrays["cls_true"], arrays["cls_pred"], average="macro"))
    ious = jaccard_score(masks.ravel(), preds.ravel(), average=None)
    assert outcome_value(arrays, "seg_miou") == pytest.approx(ious.mean())
    assert outcome_value(arrays, "seg_miou_fg") == pytest.approx(ious[1:].mean())
    assert outcome_value(arrays, "seg_iou_b", class_names=CLASSES) == pytest.approx(ious[2])
    assert outcome_value(arrays, "seg_pair_iou_a__c", class_names=CLASSES) == pytest.approx((ious[1] + ious[3]) / 2)
    idx = np.array([0, 0, 5, 7])  # a resample: repeats count repeatedly
    assert outcome_value(arrays, "cls_accuracy", idx) == pytest.approx(
        accuracy_score(arrays["cls_true"][idx], arrays["cls_pred"][idx]))
    sub = jaccard_score(masks[idx].ravel(), preds[idx].ravel(), average=None)
    assert outcome_value(arrays, "seg_miou", idx) == pytest.approx(sub.mean())


def test_swap_rate_closed_form():
    conf = np.zeros((4, 4), int)
    conf[1, 1], conf[1, 2], conf[2, 1], conf[2, 2], conf[1, 0], conf[3, 1] = 6, 2, 1, 1, 50, 40
    assert swap_rate(conf, 1, 2) == pytest.approx(3 / 10)  # background and other classes do not count
    assert np.isnan(swap_rate(np.zeros((4, 4)), 1, 2))
    arrays = {"seg_confusion": conf[None], "path": np.array(["x"])}
    assert outcome_value(arrays, "seg_swap_a__b", class_names=CLASSES) == pytest.approx(0.3)


def test_outcome_errors_name_the_key():
    arrays, _, _ = _outcomes(np.random.default_rng(0))
    with pytest.raises(KeyError, match="unknown class 'zz'"):
        outcome_value(arrays, "seg_iou_zz", class_names=CLASSES)
    with pytest.raises(KeyError, match="presence_map"):
        outcome_value(arrays, "presence_map")


# ------------------------------------------------------------------------------------------------------- claims
def _claim(metric="cls_accuracy"):
    return Claim("x", "nb", "A beats B", "test", "A", "B", metric)


def _side(rng, n, p_correct):
    true = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < p_correct, true, (true + 1) % 3)
    return {"cls_true": true, "cls_pred": pred, "path": np.arange(n).astype(str)}


@pytest.mark.parametrize("p_better, p_worse, expected", [(0.95, 0.5, "demonstrated"), (0.5, 0.95, "reversed"),
                                                         (0.7, 0.7, "inconclusive")])
def test_decide(p_better, p_worse, expected):
    rng = np.random.default_rng(3)
    outcomes = {}
    for seed in range(3):
        outcomes[("A", seed)] = _side(rng, 200, p_better)
        outcomes[("B", seed)] = {**_side(rng, 200, p_worse), "cls_true": outcomes[("A", seed)]["cls_true"]}
        outcomes[("B", seed)]["cls_pred"] = np.where(rng.random(200) < p_worse, outcomes[("A", seed)]["cls_true"],
                                                     (outcomes[("A", seed)]["cls_true"] + 1) % 3)
    v = decide(_claim(), outcomes=outcomes, n_boot=300)
    assert v.verdict == expected and v.seeds == [0, 1, 2]
    assert v.differences == pytest.approx([b - w for b, w in zip(v.better_values, v.worse_values)])
    assert expected.upper() in sentence(v)
    t = decide(_claim(), outcomes=outcomes, n_boot=50, decides=False)
    assert t.verdict == "not decided (test scale)" and sentence(t).startswith("TEST SCALE")


def test_decide_lower_is_better_and_values_only():
    claim = Claim("y", "nb", "A conflicts less", "test", "A", "B", "hd", per_image=False, higher_is_better=False)
    values = {("A", s): 1.0 + 0.01 * s for s in range(3)} | {("B", s): 2.0 + 0.02 * s for s in range(3)}
    v = decide(claim, values=values)
    assert v.verdict == "demonstrated" and all(d > 0 for d in v.differences)  # signed: positive = the claim
    assert np.isnan(v.boot_low)


def test_claims_registry_is_consistent():
    ids = [c.id for c in CLAIMS]
    assert len(ids) == len(set(ids))
    for c in CLAIMS:
        if c.kind == "variants":
            assert c.better in VARIANTS and c.worse in VARIANTS, c.id
        assert c.better != c.worse and c.statement and c.source
    assert "EndoARSS" in VARIANTS and VARIANTS["EndoARSS"] == {}


# ------------------------------------------------------------------------------------------------------ ceiling
def test_patch_majority_closed_form():
    mask = np.zeros((28, 28), int)
    mask[:14, :14] = 1  # one whole patch
    mask[14:20, 14:20] = 2  # 36 of 196 pixels: never a majority
    mask[0:14, 14:22] = 3  # 112 of 196: the majority of its patch
    pred = patch_majority(mask, 14, 4)
    assert (pred[:14, :14] == 1).all() and (pred[14:, 14:] == 0).all() and (pred[:14, 14:] == 3).all()
    r = patch_ceiling([mask], 14, 4, class_names=("bg", "one", "two", "three"))
    assert r["iou_one"] == 1.0 and r["iou_two"] == 0.0 and r["iou_three"] == pytest.approx(112 / 196)
    with pytest.raises(ValueError, match="whole number"):
        patch_majority(np.zeros((20, 28)), 14, 2)


def test_activity_ceiling_closed_form():
    # classes 0 background, 1 / 2 a look-alike pair, 3 a cue. Activity 0 shows class 1, activity 1 class 2 and, in
    # half its images, class 3. Merged, the oracle tells them apart only by class 3; unmerged, always.
    def mask(*classes):
        m = np.zeros((4, 4), int)
        for i, c in enumerate(classes):
            m[i, :] = c
        return m

    images = [(mask(1), 0)] * 6 + [(mask(2, 3), 1)] * 2 + [(mask(2), 1)] * 2
    merged = activity_ceiling(images, images, merge=[(1, 2)])
    # {0, 1}: 6 of activity 0 and 2 of 1 -> answers 0 (8 images, 6 right); {0, 1, 3}: activity 1 (2 right)
    assert merged["accuracy"] == pytest.approx(8 / 10) and merged["n_test"] == 10
    assert activity_ceiling(images, images)["accuracy"] == 1.0
    # a class set never seen in training gets the overall majority (activity 0); 255 is ignored
    unseen = mask(3)
    unseen[0, 0] = 255
    assert activity_ceiling(images, [(unseen, 1), (unseen, 0)], merge=[(1, 2)])["accuracy"] == 0.5
    with pytest.raises(ValueError, match="train"):
        activity_ceiling([], images)


def test_activity_ceiling_matches_a_pandas_majority_vote():
    import pandas as pd

    rng = np.random.default_rng(4)
    def draw(n):
        return [(rng.integers(0, 5, (3, 3)) * (rng.random((3, 3)) < 0.4), int(rng.integers(0, 3))) for _ in range(n)]
    train, test = draw(300), draw(200)
    merge = [(1, 2), (3, 4)]
    got = activity_ceiling(train, test, merge=merge)["accuracy"]

    def key(m):
        m = np.where(m == 2, 1, np.where(m == 4, 3, m))
        return ",".join(map(str, np.unique(m)))
    frame = pd.DataFrame([{"sig": key(m), "y": y} for m, y in train])
    table = frame.groupby(["sig", "y"]).size().reset_index(name="n").sort_values(["sig", "n", "y"],
                                                                                   ascending=[True, False, True])
    answer = table.drop_duplicates("sig").set_index("sig")["y"].to_dict()
    default = frame["y"].value_counts().sort_index().idxmax()
    expected = np.mean([answer.get(key(m), default) == y for m, y in test])
    assert got == pytest.approx(expected)


def test_activity_ceiling_of_the_synthetic_esd_data_is_set_by_bleeding():
    # on MTLESD the merged oracle can only tell a dissection from an injection by its bleeding: its accuracy is
    # P(marking) + P(injection) + P(dissection with bleeding drawn), each counted here from the rendered masks
    from endoarss_lib.data import LOOK_ALIKE_PAIRS, get_spec
    from endoarss_lib.data.synthetic import render_sample

    spec = get_spec("synthetic_mtlesd")
    ids = {n: i for i, n in enumerate(spec.seg_classes)}
    merge = [(ids[a], ids[b]) for a, b in LOOK_ALIKE_PAIRS["mtlesd"]]
    rng = np.random.default_rng(0)
    shares = np.array([0.3, 0.3, 0.4])
    def draw(n):
        return [(render_sample("mtlesd", int(a), rng, 64)[1], int(a)) for a in rng.choice(3, n, p=shares)]
    train, test = draw(240), draw(240)
    got = activity_ceiling(train, test, merge=merge)
    dissect = spec.activities.index("submucosal_dissection")
    labels = np.array([y for _, y in test])
    bled = np.array([(m == ids["bleeding"]).any() for m, _ in test])
    expected = np.mean((labels != dissect) | bled)  # answers injection for a stained image without bleeding
    assert got["accuracy"] == pytest.approx(expected, abs=0.02)
    assert 0.7 < got["accuracy"] < 0.95
    assert activity_ceiling(train, test)["accuracy"] > 0.97  # with the pairs told apart


# ------------------------------------------------------------------------------------------------------- scales
def test_scales():
    assert not get_scale("test").decides and get_scale("demonstration").decides
    demo = SCALES["demonstration"]
    assert demo.image_size // 14 == 16 and demo.n_train >= 240 and demo.n_test >= 96 and len(demo.seeds) >= 3
    assert "TEST SCALE" in get_scale("test").caption()
    with pytest.raises(ValueError, match="demonstration"):
        get_scale("paper")


def test_scale_reaches_the_runs_and_its_caption_says_how_they_train(tmp_path):
    # each scale's schedule and stopping reach the notebooks' run configs, and the caption words exactly them
    from endoarss_lib.experiments.experiment import Experiment

    for name, sc in SCALES.items():
        cfg = Experiment("x", scale=name, out_dir=str(tmp_path / name), runs_dir=str(tmp_path / "runs"),
                         progress=None).base
        assert (cfg.scheduler, cfg.patience, cfg.epochs, cfg.image_size) == (sc.scheduler, sc.patience, sc.epochs,
                                                                             sc.image_size)
        if sc.decides:
            caption = sc.caption()
            assert ("early stopping" in caption) == bool(sc.patience), caption
            assert ("cosine" in caption) == (sc.scheduler == "cosine"), caption


def test_restricted_outcomes_compare_like_with_like():
    from endoarss_lib.evidence.outcomes import restrict_outcomes
    from endoarss_lib.metrics import subset_metrics

    arrays, masks, preds = _outcomes(np.random.default_rng(2))
    kept = restrict_outcomes(arrays, labels=[0, 2], classes=[0, 1, 3])
    rows = np.isin(arrays["cls_true"], [0, 2])
    assert len(kept["path"]) == rows.sum() and (kept["cls_true"] != 1).all()
    assert outcome_value(kept, "cls_accuracy") == pytest.approx(
        accuracy_score(arrays["cls_true"][rows], arrays["cls_pred"][rows]))
    ious = jaccard_score(masks[rows].ravel(), preds[rows].ravel(), average=None)
    assert outcome_value(kept, "seg_miou_eval") == pytest.approx(ious[[0, 1, 3]].mean())
    assert outcome_value(kept, "seg_miou_eval") == pytest.approx(
        subset_metrics(kept["seg_confusion"].sum(0), [0, 1, 3])["miou"])


def test_assert_learns_checks_the_named_tasks_only():
    # closed-form rows: activity at the majority share (no better than always answering the commonest activity),
    # foreground mIoU above 0 (better than predicting background everywhere)
    from endoarss_lib.experiments.results import assert_learns

    row = {"test_cls_accuracy": 1 / 3, "test_cls_majority_accuracy": 1 / 3, "test_seg_miou_fg": 0.2}
    with pytest.raises(AssertionError, match=r"\['cls'\]"):
        assert_learns(row)
    assert_learns(row, tasks=["seg"])  # segmentation alone beats its prior
    with pytest.raises(AssertionError, match=r"\['cls'\]"):
        assert_learns(row, tasks=["cls", "seg"])
    with pytest.raises(ValueError, match="presence"):
        assert_learns(row, tasks=["presence"])  # a task the row was not tested on is not silently passed
