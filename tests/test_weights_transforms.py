"""Weight records carry their input transform (torchvision's ``weights.transforms()``) and the data pipeline reads it:
the bundled foundation model, a user's DINOv2 file and a file with its own record get the normalisation they expect
without a second setting; ``normalize`` still overrides it; unchanged configurations keep their results hash."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from endoarss_lib.config import preset
from endoarss_lib.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from endoarss_lib.models.pretrained import get_pretrained, weights_dir, weights_transforms
from endoarss_lib.training.engine import make_datasets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
OTHER = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])  # a record's own mean / std


def test_bundled_record_carries_its_transforms():
    record = json.loads((weights_dir() / "synthdino_vit_mini14.json").read_text())
    t = get_pretrained("synthdino_vit_mini14").transforms()
    assert (list(t.mean), list(t.std), t.image_size) == (record["mean"], record["std"], record["image_size"])
    # measured: the bundled record's mean/std are ImageNet's, so the default runs' normalisation is unchanged
    assert tuple(record["mean"]) == IMAGENET_MEAN and tuple(record["std"]) == IMAGENET_STD
    assert t.normalize == "imagenet" == preset("smoke").input_normalization()


def test_transforms_call_resizes_and_normalises():
    t = weights_transforms(None, "dinov2_vits14")
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    out = t(image)
    expected = (image.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert t(image, size=14).shape == (3, 14, 14)


def test_a_users_dinov2_file_gets_imagenet_and_a_file_with_a_record_gets_its_own(tmp_path):
    dinov2 = tmp_path / "dinov2_vits14_pretrain.pth"
    dinov2.write_bytes(b"")
    assert weights_transforms(str(dinov2), "dinov2_vits14").normalize == "imagenet"  # DINOv2's published convention
    assert weights_transforms(False, "resnet101").normalize == "imagenet"
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"")
    (tmp_path / "mine.json").write_text(json.dumps({"file": "mine.safetensors", "mean": OTHER[0], "std": OTHER[1],
                                                    "image_size": 112}))
    assert weights_transforms(str(own), "vit_tiny_patch14").normalize == (tuple(OTHER[0]), tuple(OTHER[1]))


def test_the_data_pipeline_reads_the_weights_normalisation(tmp_path):
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"")
    (tmp_path / "mine.json").write_text(json.dumps({"file": own.name, "mean": OTHER[0], "std": OTHER[1]}))
    common = dict(image_size=56, synthetic_n_train=8, synthetic_n_test=4, augment=False,
                  model={"backbone": "vit_tiny_patch14", "pretrained": str(own)})
    cfg = preset("smoke", **common)
    test = make_datasets(cfg, splits=("test",))["test"]
    pixels = np.asarray(Image.open(test.samples[0].image).convert("RGB"), dtype=np.float64) / 255  # 56 px on disk
    expected = (pixels - OTHER[0]) / OTHER[1]
    np.testing.assert_allclose(test[0]["image"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    # an explicit normalize overrides the record, and the results hash follows the normalisation actually used
    override = preset("smoke", normalize="imagenet", **common)
    imagenet = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(make_datasets(override, splits=("test",))["test"][0]["image"].permute(1, 2, 0).numpy(),
                               imagenet, atol=1e-6)
    assert cfg.results_hash() != override.results_hash()
    # null and the value it resolves to are one configuration (the run store keeps its folders)
    assert preset("smoke").results_hash() == preset("smoke", normalize="imagenet").results_hash() == "70b7f18df9ea"
    assert preset("released", data_root="/x").input_normalization() == "unit"
