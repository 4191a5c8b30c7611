"""The decoded-image cache: the same items and the same training runs as without it, built once, keyed, atomic."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import endoarss_lib
from endoarss_lib.config import CUDA_NUM_WORKERS, preset
from endoarss_lib.data import MTLDataset, make_synthetic
from endoarss_lib.data import cache as cache_module
from endoarss_lib.training.engine import fit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Synthetic frames at 64 px, read at 28 / 42 px: every item is resized."""
    return make_synthetic(tmp_path_factory.mktemp("data") / "esd", "mtlesd", n_train=10, n_test=4, image_size=64)


def _pair(root: Path, cache_dir: Path, **kw) -> tuple[MTLDataset, MTLDataset]:
    plain = MTLDataset(root, "train", val_fraction=0.2, **kw)
    cached = MTLDataset(root, "train", val_fraction=0.2, **kw)
    cached.use_cache(cache_dir, progress=False)
    return plain, cached


def _same_items(a: MTLDataset, b: MTLDataset, seed: int | None = None) -> None:
    for i in range(len(a)):
        if seed is not None:
            torch.manual_seed(seed + i)
        x = a[i]
        if seed is not None:
            torch.manual_seed(seed + i)
        y = b[i]
        assert x["image"].dtype == y["image"].dtype and x["mask"].dtype == y["mask"].dtype
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]), i
        assert x["label"] == y["label"] and x["path"] == y["path"]


@pytest.mark.parametrize("kw", [dict(image_size=42), dict(image_size=28, resize_mode="letterbox"),
                                dict(image_size=42, id_map="released", normalize="unit")])
def test_resized_cache_gives_the_same_items(root, tmp_path, kw):
    plain, cached = _pair(root, tmp_path, **kw)
    assert cached.cache.resized and cached.cache.index[0, 1:3].tolist() == [kw["image_size"]] * 2
    _same_items(plain, cached)


def test_full_size_cache_keeps_augmentation_exact(root, tmp_path):
    # augmentation crops the full-size frame: the cache holds decoded full-size arrays, and the random draws give
    # the same crops, flips and jitter as the files
    plain, cached = _pair(root, tmp_path, image_size=42, augment=True)
    assert not cached.cache.resized and cached.cache.index[0, 1:3].tolist() == [64, 64]
    _same_items(plain, cached, seed=123)


def test_cache_is_built_once_keyed_and_never_in_the_package(root, tmp_path):
    first = MTLDataset(root, "train", image_size=42).use_cache(tmp_path, progress=False)
    stamp = (first / "meta.json").stat().st_mtime_ns
    again = MTLDataset(root, "train", image_size=42).use_cache(tmp_path, progress=False)
    assert again == first and (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = {MTLDataset(root, "train", image_size=28).use_cache(tmp_path, progress=False),
             MTLDataset(root, "train", image_size=42, resize_mode="letterbox").use_cache(tmp_path, progress=False),
             MTLDataset(root, "train", image_size=42, id_map="released").use_cache(tmp_path, progress=False),
             MTLDataset(root, "test", image_size=42).use_cache(tmp_path, progress=False),
             MTLDataset(root, "train", image_size=42, augment=True).use_cache(tmp_path, progress=False)}
    assert first not in other and len(other) == 5
    meta = json.loads((first / "meta.json").read_text())
    assert meta["key"]["fingerprint"] == MTLDataset(root, "train", image_size=42).fingerprint()
    assert meta["mask_dtype"] == "uint8" and not [p for p in tmp_path.iterdir() if p.name.endswith(".building")]
    with pytest.raises(ValueError, match="inside the installed package"):
        MTLDataset(root, "train", image_size=42).use_cache(Path(endoarss_lib.__file__).parent / "cache")


def test_changed_data_get_a_new_cache(tmp_path):
    data = make_synthetic(tmp_path / "esd", "mtlesd", n_train=6, n_test=2, image_size=32)
    before = MTLDataset(data, "test", image_size=28).use_cache(tmp_path / "cache", progress=False)
    mask = sorted((data / "test").rglob("mask/*.png"))[0]
    from PIL import Image

    pixels = np.asarray(Image.open(mask)).copy()
    pixels[0, 0] = 0 if pixels[0, 0] else 1
    Image.fromarray(pixels).save(mask)
    after = MTLDataset(data, "test", image_size=28)
    assert after.use_cache(tmp_path / "cache", progress=False) != before
    _same_items(MTLDataset(data, "test", image_size=28), after)


def test_a_failed_build_leaves_nothing(root, tmp_path, monkeypatch):
    real = cache_module._item

    def failing(dataset, index, resized):
        if index == 2:
            raise OSError("disk full (simulated)")
        return real(dataset, index, resized)

    monkeypatch.setattr(cache_module, "_item", failing)
    with pytest.raises(OSError, match="simulated"):
        MTLDataset(root, "train", image_size=42).use_cache(tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # no cache, no temporary folder
    monkeypatch.setattr(cache_module, "_item", real)
    folder = MTLDataset(root, "train", image_size=42).use_cache(tmp_path, progress=False)
    assert (folder / "meta.json").is_file()


@pytest.mark.parametrize("damage", ["no meta", "bad index", "short"])
def test_a_damaged_cache_is_moved_aside_and_rebuilt(root, tmp_path, damage):
    folder = MTLDataset(root, "train", image_size=42).use_cache(tmp_path, progress=False)
    if damage == "no meta":
        (folder / "meta.json").unlink()
    elif damage == "bad index":
        (folder / "index.npy").write_bytes(b"not numpy")
    else:  # a cache of fewer items than the dataset has
        index = np.load(folder / "index.npy")
        np.save(folder / "index.npy", index[:-1])
    with pytest.warns(UserWarning, match="damaged data cache.*moved to"):
        again = MTLDataset(root, "train", image_size=42).use_cache(tmp_path, progress=False)
    assert again == folder
    aside = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].name.startswith(folder.name)  # kept, not deleted
    plain, cached = _pair(root, tmp_path, image_size=42)
    _same_items(plain, cached)


@pytest.mark.parametrize("augment", [True, False])
def test_training_with_the_cache_equals_training_without(tmp_path, augment):
    common = dict(image_size=56, synthetic_n_train=16, synthetic_n_test=6, batch_size=4, epochs=2, progress=False,
                  augment=augment, keep_last=True, model={"backbone": "vit_tiny_patch14", "arch": "tesla"})
    plain = fit(preset("smoke", out_dir=str(tmp_path / "plain"), data_cache=False, **common))
    cached_cfg = preset("smoke", out_dir=str(tmp_path / "cached"), data_cache=True, cache_dir=str(tmp_path / "c"),
                        **common)
    cached = fit(cached_cfg)
    assert list((tmp_path / "c").glob("*-train-*")), "the cached run did not use the cache"
    assert cached["config_hash"] == plain["config_hash"]
    for key in [k for k in plain if k.startswith(("test_", "val_"))]:
        a, b = plain[key], cached[key]
        assert (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == b, key
    last_a = torch.load(Path(plain["run_dir"]) / "last.pt", weights_only=True)["model"]
    last_b = torch.load(Path(cached["run_dir"]) / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def test_loader_defaults_follow_the_device_and_never_the_hash():
    cfg = preset("smoke")
    assert cfg.runtime_settings(cuda=True) == {"data_cache": True, "num_workers": CUDA_NUM_WORKERS,
                                               "pin_memory": True, "persistent_workers": True}
    assert cfg.runtime_settings(cuda=False) == {"data_cache": False, "num_workers": 0, "pin_memory": False,
                                                "persistent_workers": False}
    given = preset("smoke", data_cache=False, num_workers=2, pin_memory=False, persistent_workers=False)
    assert given.runtime_settings(cuda=True) == {"data_cache": False, "num_workers": 2, "pin_memory": False,
                                                 "persistent_workers": False}
    assert preset("smoke", num_workers=0).runtime_settings(cuda=True)["persistent_workers"] is False
    variants = [preset("smoke", data_cache=v, cache_dir=d, num_workers=w, pin_memory=p)
                for v, d, w, p in [(True, "/tmp/x", 3, True), (False, None, 0, False), (None, None, None, None)]]
    assert len({c.results_hash() for c in variants}) == 1 and variants[0].results_hash() == cfg.results_hash()
