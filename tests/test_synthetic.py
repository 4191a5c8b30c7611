"""The synthetic dataset: layout, card, determinism, cache, class frequencies and the premise it must carry."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from endoarss_lib.data import synthetic as syn
from endoarss_lib.data.registry import DATASETS, SYNTHETIC_PRESETS

SIZE = 64  # layout and cache tests
PREMISE_SIZE = 112  # statistics need a few pixels across the thin shafts


def spec_of(preset):
    return DATASETS[SYNTHETIC_PRESETS[preset]]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def render(preset, split, per_activity, size=PREMISE_SIZE, seed=0):
    """(activity id, image, mask) for the first ``per_activity`` images of every activity of a preset."""
    spec = spec_of(preset)
    out = []
    for name in syn.preset_activities(preset):
        a = spec.activities.index(name)
        for k in range(per_activity):
            image, mask = syn.render_sample(preset, a, syn.sample_rng(seed, preset, split, a, k), size)
            out.append((a, image, mask))
    return out


@pytest.fixture(scope="module")
def esd_root(tmp_path_factory):
    return syn.make_synthetic(tmp_path_factory.mktemp("syn") / "esd", "mtlesd", seed=3, n_train=9, n_test=6,
                              image_size=SIZE)


# ------------------------------------------------------------------------------------------------- layout, card
def test_layout_and_card(esd_root):
    card = json.loads((esd_root / "dataset_card.json").read_text())
    spec = spec_of("mtlesd")
    assert card["dataset"] == "synthetic_mtlesd" and card["preset"] == "mtlesd" and card["synthetic"] is True
    assert card["seed"] == 3 and card["image_size"] == SIZE and card["generator_version"] == syn.GENERATOR_VERSION
    assert card["activities"] == list(spec.activities) and card["seg_classes"] == list(spec.seg_classes)
    assert card["look_alike_pairs"] == [["injection_needle", "electrosurgical_knife"], ["fluid_bleb", "exposed_submucosa"]]
    assert "synthetic" in card["note"] and "nothing" in card["note"]
    assert set(card["counts"]) == {"train", "test"}
    for split, counts in card["counts"].items():
        assert sum(counts.values()) == {"train": 9, "test": 6}[split]
        assert abs(sum(card["pixel_fraction"][split].values()) - 1.0) < 1e-4
        names = []
        for activity, n in counts.items():
            folder = esd_root / split / str(spec.activities.index(activity) + 1)
            images = sorted((folder / "image").glob("*.png"))
            masks = sorted((folder / "mask").glob("*.png"))
            assert len(images) == n and [p.name for p in masks] == [p.name for p in images]
            names += [p.name for p in images]
            for img_path, mask_path in zip(images, masks):
                with Image.open(img_path) as img, Image.open(mask_path) as mask:
                    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
                    assert mask.mode == "L" and mask.size == (SIZE, SIZE)
                    assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(spec.num_seg_classes))
        assert len(set(names)) == len(names) and all(len(n) == len("000042.png") for n in names)
    assert not list(esd_root.parent.glob(".esd.*"))  # no temporary folders left behind


def test_pixel_fraction_matches_masks(esd_root):
    card = json.loads((esd_root / "dataset_card.json").read_text())
    masks = [np.asarray(Image.open(p)) for p in sorted((esd_root / "test").glob("*/mask/*.png"))]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=7)
    expected = {c: counts[i] / counts.sum() for i, c in enumerate(spec_of("mtlesd").seg_classes)}
    for name, fraction in card["pixel_fraction"]["test"].items():
        assert fraction == pytest.approx(expected[name], abs=1e-5)


def test_render_sample_contract():
    image, mask = syn.render_sample("mtlendovis", "suction", np.random.default_rng(0), image_size=48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8
    first, _ = syn.render_sample("mtlesd", "injection", np.random.default_rng(1), 48)
    again, _ = syn.render_sample("mtlesd", 1, np.random.default_rng(1), 48)  # name or id-space index
    assert np.array_equal(first, again)
    esd, esd_mask = syn.render_sample("mtlesd", 0, np.random.default_rng(2), 64)
    assert esd[0, 0].tolist() == [0, 0, 0] and esd_mask[0, 0] == 0  # outside the circular field of view
    with pytest.raises(ValueError, match="activity"):
        syn.render_sample("mtlendovis_gen", "suction", np.random.default_rng(0), 48)  # not in the gen subset


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(tmp_path, esd_root):
    again = syn.make_synthetic(tmp_path / "a", "mtlesd", seed=3, n_train=9, n_test=6, image_size=SIZE)
    other = syn.make_synthetic(tmp_path / "b", "mtlesd", seed=4, n_train=9, n_test=6, image_size=SIZE)
    assert tree_hashes(again) == tree_hashes(esd_root)
    same_names = tree_hashes(other)
    assert same_names.keys() == tree_hashes(esd_root).keys()
    assert sum(same_names[k] != v for k, v in tree_hashes(esd_root).items() if k.endswith(".png")) > 20


def test_image_independent_of_how_many_are_drawn(tmp_path, esd_root):
    more = syn.make_synthetic(tmp_path / "more", "mtlesd", seed=3, n_train=30, n_test=1, image_size=SIZE)
    for root in (esd_root, more):
        for a in range(3):
            first = sorted((root / "train" / str(a + 1) / "image").glob("*.png"))[0]
            expected, _ = syn.render_sample("mtlesd", a, syn.sample_rng(3, "mtlesd", "train", a, 0), SIZE)
            assert np.array_equal(np.asarray(Image.open(first)), expected)


# ------------------------------------------------------------------------------------------------------ cache
def test_cache_then_conflict_then_overwrite(tmp_path):
    root = syn.make_synthetic(tmp_path / "d", "mtlesd", seed=0, n_train=3, n_test=3, image_size=SIZE)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert syn.make_synthetic(root, "mtlesd", seed=0, n_train=3, n_test=3, image_size=SIZE) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    with pytest.raises(FileExistsError, match="overwrite"):
        syn.make_synthetic(root, "mtlesd", seed=1, n_train=3, n_test=3, image_size=SIZE)
    syn.make_synthetic(root, "mtlesd", seed=1, n_train=3, n_test=3, image_size=SIZE, overwrite=True)
    assert json.loads((root / "dataset_card.json").read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # old copy and temporaries removed


def test_foreign_folder_is_not_touched(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        syn.make_synthetic(root, "mtlesd", n_train=3, n_test=0, image_size=SIZE)
    assert (root / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (syn.make_synthetic(empty, "mtlesd", n_train=0, n_test=3, image_size=SIZE) / "test").is_dir()


# ------------------------------------------------------------------------------------------------ frequencies
def test_activity_frequencies():
    endovis = syn.activity_counts("mtlendovis", 240)
    assert sum(endovis.values()) == 240 and min(endovis.values()) >= 1
    assert max(endovis.values()) / min(endovis.values()) >= 5  # long tail
    assert set(syn.activity_counts("mtlendovis", 12).values()) == {1}
    esd = syn.activity_counts("mtlesd", 120)
    assert sum(esd.values()) == 120 and max(esd.values()) / min(esd.values()) < 1.5  # roughly balanced
    assert list(syn.activity_counts("mtlendovis_gen", 48)) == list(syn.preset_activities("mtlendovis_gen"))


def test_gen_preset_is_a_test_only_subset(tmp_path):
    root = syn.make_synthetic(tmp_path / "gen", "mtlendovis_gen", n_test=18, image_size=SIZE)
    spec = spec_of("mtlendovis_gen")
    assert not (root / "train").exists()
    folders = {p.name for p in (root / "test").iterdir()}
    assert folders == {str(a + 1) for a in spec.eval_activities}
    ids = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in root.glob("test/*/mask/*.png")]))
    assert set(ids.tolist()) <= set(spec.eval_seg_classes)
    card = json.loads((root / "dataset_card.json").read_text())
    assert set(card["counts"]) == {"test"} and len(card["counts"]["test"]) == 6
    assert card["used_seg_classes"] == [spec.seg_classes[i] for i in spec.eval_seg_classes]


# ------------------------------------------------------------------------------------------------ the premise
def _pair_pixels(samples, class_a, class_b):
    """RGB of every pixel of the two classes, whether it is class_b, the image's activity, and shaft widths."""
    rgb, is_b, activity, widths = [], [], [], {class_a: [], class_b: []}
    for a, image, mask in samples:
        for c in (class_a, class_b):
            sel = mask == c
            if sel.any():
                rgb.append(image[sel] / 255.0)
                is_b.append(np.full(sel.sum(), c == class_b))
                activity.append(np.full(sel.sum(), a))
                widths[c].append(2 * ndimage.distance_transform_edt(sel).max())
    return np.concatenate(rgb), np.concatenate(is_b), np.concatenate(activity), widths


def _balanced_accuracy(pred, truth):
    return 0.5 * ((pred[truth] == 1).mean() + (pred[~truth] == 0).mean())


@pytest.mark.parametrize("preset", ["mtlesd", "mtlendovis"])
def test_look_alike_pair_needs_the_activity(preset):
    spec = spec_of(preset)
    per = 24 if preset == "mtlesd" else 4  # enough images that per-image metal brightness averages out
    train, test = render(preset, "train", per), render(preset, "test", per)
    for name_a, name_b in syn.LOOK_ALIKE_PAIRS[preset]:
        a, b = spec.seg_classes.index(name_a), spec.seg_classes.index(name_b)
        x_tr, y_tr, act_tr, width = _pair_pixels(train, a, b)
        x_te, y_te, act_te, _ = _pair_pixels(test, a, b)
        assert y_tr.mean() > 0.2 and y_tr.mean() < 0.8  # both classes really present
        # Colour alone: a per-pixel classifier on RGB is at chance.
        weight = np.where(y_tr, 0.5 / y_tr.mean(), 0.5 / (1 - y_tr.mean()))
        colour = LogisticRegression(max_iter=500).fit(x_tr, y_tr, sample_weight=weight)
        assert _balanced_accuracy(colour.predict(x_te), y_te) < 0.6
        assert np.abs(x_tr[y_tr].mean(0) - x_tr[~y_tr].mean(0)).max() < 0.04  # mean RGB nearly identical
        assert np.mean(width[a]) == pytest.approx(np.mean(width[b]), rel=0.15)  # same shaft width
        # The activity alone (majority class per activity, learnt on train) separates them.
        by_activity = {act: y_tr[act_tr == act].mean() > 0.5 for act in np.unique(act_tr)}
        pred = np.array([by_activity.get(act, False) for act in act_te])
        assert _balanced_accuracy(pred, y_te) > 0.95


def _colour_histogram(image):
    """Log counts of an 8x8x8 RGB histogram: a deliberately cheap image feature."""
    q = image.reshape(-1, 3) // 32
    return np.log1p(np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512))


@pytest.mark.parametrize("preset, per_train, minimum", [("mtlesd", 20, 0.8), ("mtlendovis", 20, 0.4)])
def test_activity_is_visible(preset, per_train, minimum):
    train, test = render(preset, "train", per_train), render(preset, "test", 8)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.3))
    model.fit([_colour_histogram(i) for _, i, _ in train], [a for a, _, _ in train])
    accuracy = np.mean(model.predict([_colour_histogram(i) for _, i, _ in test]) == [a for a, _, _ in test])
    assert accuracy > minimum  # chance: 1/3 and 1/12


def test_gen_tissue_colour_is_shifted():
    def tissue_mean(preset):
        samples = render(preset, "test", 2, size=64)
        return np.concatenate([i[(m == 0) & (i.sum(-1) > 60)] for _, i, m in samples]).mean(0)
    assert np.linalg.norm(tissue_mean("mtlendovis_gen") - tissue_mean("mtlendovis")) > 20  # of 255


@pytest.mark.parametrize("preset", ["mtlesd", "mtlendovis"])
def test_pair_class_is_determined_by_activity(preset):
    spec = spec_of(preset)
    name_a, name_b = syn.LOOK_ALIKE_PAIRS[preset][0]
    a, b = spec.seg_classes.index(name_a), spec.seg_classes.index(name_b)
    seen = {}
    for act, _, mask in render(preset, "train", 6, size=48):
        present = {c for c in (a, b) if (mask == c).any()}
        assert len(present) <= 1  # never both in one image
        seen.setdefault(act, set()).update(present)
    assert all(len(classes) <= 1 for classes in seen.values())


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, name", [
    (dict(preset="endovis"), "preset"),
    (dict(n_train=-1), "n_train"),
    (dict(n_test=2.5), "n_test"),
    (dict(image_size=16), "image_size"),
    (dict(seed=-3), "seed"),
    (dict(n_train=0, n_test=0), "n_train"),
])
def test_bad_parameters_name_themselves(tmp_path, kwargs, name):
    args = dict(root=tmp_path / "x", preset="mtlesd", n_train=2, n_test=2, image_size=SIZE) | kwargs
    with pytest.raises(ValueError, match=name):
        syn.make_synthetic(**args)
    assert not (tmp_path / "x").exists()


def test_root_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="root"):
        syn.make_synthetic(path, "mtlesd", n_train=2, n_test=2, image_size=SIZE)


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(syn, "_write_split", boom)
    with pytest.raises(RuntimeError):
        syn.make_synthetic(tmp_path / "d", "mtlesd", n_train=2, n_test=2, image_size=SIZE)
    assert os.listdir(tmp_path) == []
