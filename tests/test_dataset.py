"""MTLDataset on hand-made layouts: items, splits, transforms, and every bad input of docs/data.md."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from endoarss_lib.data import DataError, MTLDataset
from endoarss_lib.data.dataset import IMAGENET_MEAN, IMAGENET_STD, stratified_split


def write_pair(root: Path, split: str, activity: int, name: str, size=(40, 30), mask_value=None, rng=None,
               image_suffix=".png"):
    """One image + index mask; the mask's left half is 0 and its right half ``mask_value`` (default: activity)."""
    rng = rng or np.random.default_rng(0)
    w, h = size
    for sub in ("image", "mask"):
        (root / split / str(activity) / sub).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = activity if mask_value is None else mask_value
    Image.fromarray(image).save(root / split / str(activity) / "image" / f"{name}{image_suffix}")
    Image.fromarray(mask, mode="L").save(root / split / str(activity) / "mask" / f"{name}.png")
    return image, mask


@pytest.fixture
def esd_root(tmp_path):
    """A tiny MTLESD-like layout: 3 activities, 6 train and 2 test images each."""
    root = tmp_path / "esd"
    rng = np.random.default_rng(1)
    for activity in (1, 2, 3):
        for i in range(6):
            write_pair(root, "train", activity, f"a{activity}_{i:02d}", rng=rng)
        for i in range(2):
            write_pair(root, "test", activity, f"t{activity}_{i:02d}", rng=rng)
    return root


def test_items_have_the_contract_types_and_values(esd_root):
    ds = MTLDataset(esd_root, "test", dataset="mtlesd", image_size=28)
    assert len(ds) == 6 and not ds.synthetic
    item = ds[0]
    assert set(item) == {"image", "mask", "label", "path"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 28, 28)
    assert item["mask"].dtype == torch.long and item["mask"].shape == (28, 28)
    assert item["label"].dtype == torch.long and int(item["label"]) == 0  # folder 1 -> label 0
    assert item["path"].endswith("t1_00.png")
    # Mask resized nearest: only the two ids of the source mask, left half 0, right half the activity id.
    assert set(item["mask"].unique().tolist()) == {0, 1}
    assert (item["mask"][:, :10] == 0).all() and (item["mask"][:, -10:] == 1).all()


def test_image_is_imagenet_normalised(esd_root):
    ds = MTLDataset(esd_root, "test", dataset="mtlesd", image_size=40)
    raw, _ = ds.load_raw(0)
    # image_size 40 with source width 40 / height 30: compare the pixel mean, which resizing preserves closely.
    mean = ds[0]["image"].mean(dim=(1, 2)).numpy()
    expected = (raw.reshape(-1, 3).mean(0) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(mean, expected, atol=0.05)


def test_listing_is_sorted_and_labels_follow_folders(esd_root):
    ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    names = [Path(s.image).name for s in ds.samples]
    assert names == sorted(names)
    assert ds.labels == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(ds.class_counts(), [2, 2, 2])


def test_validation_split_is_seeded_stratified_and_disjoint(esd_root):
    train = MTLDataset(esd_root, "train", dataset="mtlesd", val_fraction=1 / 3, split_seed=3)
    val = MTLDataset(esd_root, "val", dataset="mtlesd", val_fraction=1 / 3, split_seed=3)
    again = MTLDataset(esd_root, "val", dataset="mtlesd", val_fraction=1 / 3, split_seed=3)
    other = MTLDataset(esd_root, "val", dataset="mtlesd", val_fraction=1 / 3, split_seed=4)
    t, v = {s.image for s in train.samples}, {s.image for s in val.samples}
    assert not t & v and len(t | v) == 18
    assert Counter(val.labels) == {0: 2, 1: 2, 2: 2}
    assert [s.image for s in again.samples] == [s.image for s in val.samples]
    assert [s.image for s in other.samples] != [s.image for s in val.samples]


def test_stratified_split_keeps_rare_classes_in_train():
    labels = [0] * 50 + [1] * 2 + [2]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(53))
    assert [labels[i] for i in val].count(0) == 10
    assert 1 in [labels[i] for i in train] and 2 in [labels[i] for i in train]
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    # The image is white exactly where the mask is 1: after any crop / flip / scale they must still agree.
    root = tmp_path / "aligned"
    for activity in (1, 2, 3):
        for sub in ("image", "mask"):
            (root / "train" / str(activity) / sub).mkdir(parents=True)
        mask = np.zeros((60, 80), np.uint8)
        mask[10:45, 5:50] = 1
        image = np.repeat((mask * 255)[..., None], 3, axis=2)
        Image.fromarray(image).save(root / "train" / str(activity) / "image" / "x.png")
        Image.fromarray(mask, mode="L").save(root / "train" / str(activity) / "mask" / "x.png")
    ds = MTLDataset(root, "train", dataset="mtlesd", image_size=56, val_fraction=0, augment=True)
    torch.manual_seed(0)
    for _ in range(10):
        item = ds[0]
        white = item["image"].mean(0) > 0  # normalised: white (even jittered) > 0 > black
        inside = (item["mask"] == 1).float()[None, None]
        # Away from the boundary (3x3 neighbourhood all one class) image and mask must agree exactly.
        local = torch.nn.functional.avg_pool2d(inside, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
        interior = (local == 0) | (local == 1)
        assert interior.float().mean() > 0.85
        assert torch.equal(white[interior], inside[0, 0].bool()[interior])


def test_letterbox_pads_mask_with_ignore_index(esd_root):
    ds = MTLDataset(esd_root, "test", dataset="mtlesd", image_size=40, resize_mode="letterbox", ignore_index=255)
    mask = ds[0]["mask"]  # source 40 x 30: 10 rows of padding
    assert mask.shape == (40, 40)
    assert (mask == 255).sum() == 10 * 40
    assert (mask[:5] == 255).all() and (mask[-5:] == 255).all()


def test_id_map_options(esd_root):
    released = MTLDataset(esd_root, "test", dataset="mtlesd", id_map="released")
    _, mask = released.load_raw(2)  # activity 2: raw value 2 -> released map 1
    assert set(np.unique(mask)) == {0, 1}
    (esd_root / "id_map.json").write_text(json.dumps({"raw_to_train": {"0": 0, "1": 5, "2": 4, "3": 3}}))
    from_file = MTLDataset(esd_root, "test", dataset="mtlesd")
    assert set(np.unique(from_file.load_raw(0)[1])) == {0, 5}
    with pytest.raises(ValueError, match="id_map"):
        MTLDataset(esd_root, "test", dataset="mtlesd", id_map={0: 0, 1: 9})


def test_jpg_images_are_accepted(tmp_path):
    root = tmp_path / "jpg"
    for activity in (1, 2, 3):
        write_pair(root, "test", activity, "f0", image_suffix=".jpg")
    assert len(MTLDataset(root, "test", dataset="mtlesd")) == 3


def test_stray_files_are_reported_not_fatal(esd_root):
    (esd_root / "test" / "1" / "image" / "notes.txt").write_text("x")
    (esd_root / "test" / ".DS_Store").write_text("x")
    with pytest.warns(UserWarning, match="notes.txt"):
        ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    assert len(ds) == 6


# ---- bad input: every case of docs/data.md gets an error naming the file ----

def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MTLDataset(tmp_path / "nope", "train", dataset="mtlesd")


def test_missing_split(esd_root):
    import shutil
    shutil.rmtree(esd_root / "test")
    with pytest.raises(DataError, match=r"test: split folder missing"):
        MTLDataset(esd_root, "test", dataset="mtlesd")


def test_empty_activity_folder(esd_root):
    for p in (esd_root / "test" / "2" / "image").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"2/image: empty activity folder"):
        MTLDataset(esd_root, "test", dataset="mtlesd")


def test_missing_activity_folder(esd_root):
    import shutil
    shutil.rmtree(esd_root / "test" / "3")
    with pytest.warns(UserWarning, match=r"no folder for activities \['3'\]"):
        ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    assert ds.labels == [0, 0, 1, 1]


def test_unknown_activity_folder(esd_root):
    write_pair(esd_root, "test", 4, "extra")
    with pytest.raises(DataError, match=r"\['4'\] are not in 1..3"):
        MTLDataset(esd_root, "test", dataset="mtlesd")


def test_image_without_mask(esd_root):
    (esd_root / "test" / "1" / "mask" / "t1_01.png").unlink()
    with pytest.raises(DataError, match=r"image\(s\) without a mask.*t1_01.png"):
        MTLDataset(esd_root, "test", dataset="mtlesd")


def test_mask_without_image(esd_root):
    (esd_root / "test" / "1" / "image" / "t1_01.png").unlink()
    with pytest.raises(DataError, match=r"mask\(s\) without an image.*t1_01.png"):
        MTLDataset(esd_root, "test", dataset="mtlesd")


def test_size_mismatch(esd_root):
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(esd_root / "test" / "1" / "mask" / "t1_00.png")
    ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    with pytest.raises(DataError, match=r"t1_00.png: mask size 12x10 differs from its image .*t1_00.png \(40x30\)"):
        ds[0]


def test_undecodable_image(esd_root):
    (esd_root / "test" / "1" / "image" / "t1_00.png").write_bytes(b"not a png")
    ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    with pytest.raises(DataError, match=r"t1_00.png: cannot decode image"):
        ds[0]


def test_mask_id_outside_the_map(esd_root):
    write_pair(esd_root, "test", 1, "t1_00", mask_value=9)
    ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    with pytest.raises(DataError, match=r"t1_00.png: mask values \[9\] are not in the raw-to-train id map"):
        ds[0]


def test_colour_mask_is_refused(esd_root):
    rgb = np.zeros((30, 40, 3), np.uint8)
    Image.fromarray(rgb).save(esd_root / "test" / "1" / "mask" / "t1_00.png")
    ds = MTLDataset(esd_root, "test", dataset="mtlesd")
    with pytest.raises(DataError, match=r"t1_00.png: mask has mode 'RGB' \(colour\)"):
        ds[0]


def test_palette_mask_reads_indices_not_colours(esd_root):
    mask = np.zeros((30, 40), np.uint8)
    mask[:, 20:] = 3
    img = Image.fromarray(mask, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 200, 200, 200] + [0] * 756)
    img.save(esd_root / "test" / "1" / "mask" / "t1_00.png")
    _, loaded = MTLDataset(esd_root, "test", dataset="mtlesd").load_raw(0)
    np.testing.assert_array_equal(loaded, mask)


def test_bad_parameters(esd_root):
    with pytest.raises(ValueError, match="split='valid'"):
        MTLDataset(esd_root, "valid", dataset="mtlesd")
    with pytest.raises(ValueError, match="dataset='cholec80' is not registered"):
        MTLDataset(esd_root, "test", dataset="cholec80")
    with pytest.raises(ValueError, match="image_size"):
        MTLDataset(esd_root, "test", dataset="mtlesd", image_size=8)
    with pytest.raises(ValueError, match="resize_mode"):
        MTLDataset(esd_root, "test", dataset="mtlesd", resize_mode="crop")


def test_evaluation_only_dataset_has_no_train_split(tmp_path):
    root = tmp_path / "gen"
    write_pair(root, "test", 1, "f0")
    write_pair(root, "test", 7, "f1", mask_value=6)  # only some of the 12 activity folders: allowed for Gen
    ds = MTLDataset(root, "test", dataset="mtlendovis_gen")
    assert ds.labels == [0, 6]
    with pytest.raises(DataError, match="evaluation-only"):
        MTLDataset(root, "train", dataset="mtlendovis_gen")
