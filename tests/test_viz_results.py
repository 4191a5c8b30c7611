"""Overlays, palettes, atomic writes and result tables."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch

from endoarss_lib.atomic import atomic_path, write_json_atomic
from endoarss_lib.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from endoarss_lib.experiments.results import write_table
from endoarss_lib.experiments.viz import class_palette, denormalize, overlay


def test_palette_is_distinct_with_black_background():
    palette = class_palette(12)
    assert palette.shape == (12, 3) and palette.dtype == np.uint8
    assert (palette[0] == 0).all()
    assert len({tuple(c) for c in palette}) == 12


def test_overlay_blends_only_labelled_pixels():
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.int64)
    mask[0, 0], mask[1, 1] = 1, 255  # one class pixel, one ignored pixel
    palette = np.array([[0, 0, 0], [200, 0, 50]], np.uint8)
    out = overlay(image, mask, palette, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [150, 50, 75])
    assert (out[1:, :] == 100).all() and (out[0, 1:] == 100).all()


def test_denormalize_inverts_imagenet_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    tensor = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    np.testing.assert_array_equal(denormalize(tensor), rgb)


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and '"x": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_table_labels_markdown(tmp_path):
    df = pd.DataFrame([{"model": "m", "miou": 0.5}])
    csv, md = write_table(df, tmp_path / "t", "SYNTHETIC data")
    assert pd.read_csv(csv).equals(df)
    assert md.read_text().startswith("_SYNTHETIC data_") and "0.5000" in md.read_text()


def test_atomic_files_get_umask_permissions(tmp_path):
    import os
    umask = os.umask(0)
    os.umask(umask)
    path = write_json_atomic(tmp_path / "p.json", {})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_compare_sentence_names_the_better_configuration_with_its_own_value():
    import pandas as pd

    from endoarss_lib.experiments.results import compare

    rows = pd.DataFrame({"arch": ["tesla", "mmoe"], "seed": [0, 0], "test_cls_accuracy": [0.771, 0.854],
                         "test_seg_hd95": [3.0, 5.0]})
    text = compare(rows, "arch", "tesla", "mmoe", "test_cls_accuracy")
    assert text.startswith("mmoe is ahead of tesla on cls_accuracy: 0.854 vs 0.771 (by 0.083)")
    assert "one seed" in text
    text = compare(rows, "arch", "mmoe", "tesla", "test_seg_hd95")  # lower is better for HD
    assert text.startswith("tesla is ahead of mmoe on seg_hd95: 3.000 vs 5.000 (by 2.000)")
    two = pd.DataFrame({"arch": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "m": [0.5, 0.7, 0.4, 0.8]})
    # paired differences 0.1 and -0.1: mean 0, std 0.141 -> the same mean, "same" sentence
    assert compare(two, "arch", "a", "b", "m").startswith("a and b have the same m")
    three = pd.DataFrame({"arch": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "m": [0.50, 0.70, 0.45, 0.60]})
    # paired differences 0.05 and 0.10: mean 0.075 > std 0.0354 -> more than the noise
    assert "more than the noise" in compare(three, "arch", "a", "b", "m")
