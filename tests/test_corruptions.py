"""Tests of the 19 corruptions (validity, seeding, monotone damage, mask alignment) and the corrupted-set builder."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data, transform

from endoarss_lib.robustness import corruptions as C
from endoarss_lib.robustness.corrupted_sets import DONE_NAME, build_corrupted_set, image_seed
from endoarss_lib.robustness.corruptions import (CORRUPTION_GROUPS, CORRUPTIONS, DETERMINISTIC, GEOMETRIC, OURS,
                                                 corrupt, severity_schedule)

RANDOM = tuple(n for n in CORRUPTIONS if n not in DETERMINISTIC)
# Damage (PSNR to the clean image) is not monotone over severities 1..5 for these package schedules: glass_blur
# alternates 2/1/3/2/2 shuffling iterations; saturate desaturates at 1-2 and oversaturates from 3 (x2 hurts less than
# x0.1); spatter switches from water (1-3) to mud (4-5) and a small image may get little liquid at one level.
NOT_MONOTONE = ("glass_blur", "saturate", "spatter")


def _natural(size: int, which: str = "astronaut") -> np.ndarray:
    return (transform.resize(getattr(data, which)(), (size, size), anti_aliasing=True) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image64() -> np.ndarray:
    return _natural(64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# ------------------------------------------------------------------------------------------------ names and groups

def test_names_and_groups():
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    assert tuple(CORRUPTION_GROUPS) == ("noise", "blur", "occlusion", "digital")
    assert [len(g) for g in CORRUPTION_GROUPS.values()] == [4, 5, 4, 6]
    assert set(OURS) | set(GEOMETRIC) | set(DETERMINISTIC) <= set(CORRUPTIONS)
    assert not {"fog", "frost", "snow"} & set(CORRUPTIONS)  # in the package, not in the paper's list


# ----------------------------------------------------------------------------------- every corruption x severity

@pytest.mark.parametrize("name", CORRUPTIONS)
def test_valid_reproducible_and_differs(name, image64):
    clean = image64.copy()
    for severity in range(1, 6):
        out = corrupt(image64, name, severity, seed=7)
        assert out.dtype == np.uint8 and out.shape == image64.shape
        assert not np.array_equal(out, image64), f"{name} {severity} left the image unchanged"
        assert np.array_equal(out, corrupt(image64, name, severity, seed=7)), f"{name} {severity} not reproducible"
    assert np.array_equal(image64, clean)  # the input is never modified


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seed_dependence(name, image64):
    for severity in (1, 5):
        a, b = corrupt(image64, name, severity, seed=0), corrupt(image64, name, severity, seed=1)
        assert np.array_equal(a, b) == (name in DETERMINISTIC), name


def test_independent_of_and_restores_global_rng(image64):
    np.random.seed(123)
    first = corrupt(image64, "gaussian_noise", 3, seed=4)
    state = np.random.get_state()
    np.random.seed(999)
    np.random.random(5)
    state_before = np.random.get_state()
    assert np.array_equal(first, corrupt(image64, "gaussian_noise", 3, seed=4))
    after = np.random.get_state()
    assert np.array_equal(after[1], state_before[1]) and after[2] == state_before[2]
    assert not np.array_equal(state[1], after[1])


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in NOT_MONOTONE])
@pytest.mark.parametrize("which", ["astronaut", "coffee"])
def test_damage_grows_with_severity(name, which):
    image = _natural(96, which)
    for seed in (0, 1):
        psnr = [_psnr(corrupt(image, name, s, seed), image) for s in range(1, 6)]
        assert all(b <= a for a, b in zip(psnr, psnr[1:])), f"{name}: PSNR {np.round(psnr, 2)}"


@pytest.mark.parametrize("value", [0, 128, 255])
def test_flat_images_never_crash(value):
    """Flat regions (the black or grey border around an endoscope's field of view) are handled, without NaN."""
    image = np.full((40, 48, 3), value, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for name in CORRUPTIONS:
            for severity in (1, 5):
                out = corrupt(image, name, severity, seed=3)
                assert out.shape == image.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", ["bleeding", "smoke", "elastic_transform", "zoom_blur", "glass_blur", "motion_blur"])
def test_non_square_and_224(name):
    for shape in [(48, 80, 3), (224, 224, 3)]:
        image = np.ascontiguousarray(np.resize(_natural(224), shape))
        out = corrupt(image, name, 3, seed=0)
        assert out.shape == shape and out.dtype == np.uint8


# ------------------------------------------------------------------------------------------------------ masks

def _blob_mask(size: int, seed: int = 0) -> np.ndarray:
    """Flat labelled regions 0..3 with smooth boundaries."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((size, size)), size / 12)
    return np.digitize(noise, np.quantile(noise, [0.25, 0.5, 0.75])).astype(np.uint8)


PALETTE = np.array([[20, 30, 40], [220, 60, 50], [60, 200, 90], [240, 230, 80]], np.uint8)


@pytest.mark.parametrize("size", [96, 224])
@pytest.mark.parametrize("severity", [1, 5])
def test_elastic_keeps_image_and_mask_aligned(size, severity):
    mask = _blob_mask(size)
    image = PALETTE[mask]
    warped, warped_mask = corrupt(image, "elastic_transform", severity, seed=2, mask=mask)
    assert warped_mask.dtype == mask.dtype and set(np.unique(warped_mask)) <= set(np.unique(mask))
    assert (warped_mask != mask).mean() > 0.005  # the field did move the truth
    distance = ((warped.astype(np.int32)[:, :, None] - PALETTE.astype(np.int32)[None, None]) ** 2).sum(-1)
    from_pixels = distance.argmin(-1)
    pure = distance.min(-1) <= 12  # not mixed by bilinear resampling at a boundary (truncation costs <= 1/channel)
    agree, unwarped = (from_pixels == warped_mask)[pure].mean(), (from_pixels == mask)[pure].mean()
    assert pure.mean() > 0.8 and (from_pixels == warped_mask).mean() > 0.98
    assert unwarped < agree - 0.01  # the check can tell a misaligned mask
    assert agree >= 0.99, f"image and mask agree on {agree:.4f} of the unmixed pixels"


def test_elastic_matches_package_under_the_same_seed(image64):
    import imagecorruptions

    for severity in (1, 3, 5):
        np.random.seed(C._legacy_seed(11))
        reference = imagecorruptions.corrupt(image64, severity, "elastic_transform")
        assert np.array_equal(corrupt(image64, "elastic_transform", severity, seed=11), reference)


def test_elastic_mask_shapes_and_dtypes(image64):
    mask2 = _blob_mask(64).astype(np.int64)
    mask3 = np.stack([mask2, 3 - mask2], -1).astype(np.uint16)
    _, out2 = corrupt(image64, "elastic_transform", 4, seed=1, mask=mask2)
    _, out3 = corrupt(image64, "elastic_transform", 4, seed=1, mask=mask3)
    assert out2.dtype == np.int64 and out3.dtype == np.uint16 and out3.shape == mask3.shape
    assert np.array_equal(out3[..., 0], out2) and np.array_equal(out3[..., 1], 3 - out2)  # one field for all


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in GEOMETRIC])
def test_photometric_leave_mask_unchanged(name, image64):
    mask = _blob_mask(64)
    out, same = corrupt(image64, name, 5, seed=0, mask=mask)
    assert np.array_equal(same, mask) and same.dtype == mask.dtype
    assert np.array_equal(out, corrupt(image64, name, 5, seed=0))


# ----------------------------------------------------------------------------------------------- our corruptions

def test_bleeding_covers_more_with_severity():
    image = np.clip(_natural(128, "coffee").mean(-1, keepdims=True) * [0.8, 1.0, 0.9], 0, 255).astype(np.uint8)
    changed, red = [], []
    for severity in range(1, 6):
        out = corrupt(image, "bleeding", severity, seed=5).astype(np.int32)
        changed.append((np.abs(out - image).max(-1) > 8).mean())
        red.append(((out[..., 0] - np.maximum(out[..., 1], out[..., 2])) > 40).mean())
    assert all(b > a for a, b in zip(changed, changed[1:])), changed
    assert all(b > a for a, b in zip(red, red[1:])), red
    assert red[0] > 0.002 and red[-1] > 0.15


def test_smoke_lowers_contrast_with_severity():
    image = _natural(128, "astronaut")
    contrast = [(corrupt(image, "smoke", s, seed=2).mean(-1) / 255).std() for s in range(1, 6)]
    clean = (image.mean(-1) / 255).std()
    assert clean > contrast[0] and all(b < a for a, b in zip(contrast, contrast[1:])), contrast
    assert corrupt(image, "smoke", 5, seed=2).mean() > image.mean()  # a whitish haze, not a darkening


def test_gamma_follows_its_table(image64):
    for severity, params in C.GAMMA_SCHEDULE.items():
        expected = np.round(255 * (image64 / 255.0) ** params["gamma"]).astype(np.uint8)
        assert np.array_equal(corrupt(image64, "gamma", severity), expected)
    gammas = [p["gamma"] for p in C.GAMMA_SCHEDULE.values()]
    assert gammas == sorted(gammas) and gammas[0] > 1


def test_schedules_are_monotone():
    for table, keys in [(C.BLEEDING_SCHEDULE, ("count", "opacity")), (C.SMOKE_SCHEDULE, ("density", "scatter"))]:
        for key in keys:
            values = [table[s][key] for s in range(1, 6)]
            assert values == sorted(values) and len(set(values)) == 5, (key, values)
    assert C.BLEEDING_SCHEDULE[5]["count"] == 36  # the released code's single level


def test_severity_schedule():
    assert severity_schedule("bleeding")[5] == dict(C.BLEEDING_SCHEDULE[5])
    assert set(severity_schedule("smoke")) == {1, 2, 3, 4, 5}
    assert severity_schedule("elastic_transform")[1]["alpha"] == pytest.approx(12.5)
    note = severity_schedule("gaussian_noise")
    assert "imagecorruptions-imaug" in note and "c = [.08, .12, 0.18, 0.26, 0.38]" in note
    for name in CORRUPTIONS:
        assert severity_schedule(name)


# ------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(name="fog"), r"name='fog'.*valid names: gaussian_noise, shot_noise"),
    (dict(name=3), r"name=3"),
    (dict(severity=0), r"severity=0"),
    (dict(severity=6), r"severity=6"),
    (dict(severity=2.0), r"severity=2.0"),
    (dict(severity=True), r"severity=True"),
    (dict(image=np.zeros((64, 64, 3), np.float32)), r"image.dtype=float32"),
    (dict(image=np.zeros((64, 64), np.uint8)), r"image.shape=\(64, 64\)"),
    (dict(image=np.zeros((64, 64, 4), np.uint8)), r"image.shape=\(64, 64, 4\)"),
    (dict(image=np.zeros((16, 64, 3), np.uint8)), r"image.shape=.*at least 32"),
    (dict(image=[[0]]), r"image: expected a numpy array"),
    (dict(mask=np.zeros((63, 64), np.uint8)), r"mask.shape=\(63, 64\)"),
    (dict(seed=-1), r"seed=-1"),
])
def test_clear_errors(kwargs, match):
    args = dict(image=np.zeros((64, 64, 3), np.uint8), name="gaussian_noise", severity=1) | kwargs
    with pytest.raises(ValueError, match=match):
        corrupt(**args)


# ------------------------------------------------------------------------------------------------------ builder

@pytest.fixture()
def tiny_root(tmp_path) -> Path:
    """Three images in the project's layout (activities 1-3), one a JPEG, one mask a palette PNG, a card beside."""
    root = tmp_path / "clean"
    for k, (stem, suffix) in enumerate([("a", ".png"), ("b", ".jpg"), ("c", ".png")]):
        folder = root / "test" / str(k + 1)
        (folder / "image").mkdir(parents=True)
        (folder / "mask").mkdir()
        mask = _blob_mask(48, seed=k)
        Image.fromarray(PALETTE[mask]).save(folder / "image" / f"{stem}{suffix}")
        mask_img = Image.fromarray(mask)
        if k == 2:
            mask_img.putpalette(PALETTE.ravel().tolist())
        mask_img.save(folder / "mask" / f"{stem}.png")
    (root / "dataset_card.json").write_text(json.dumps({"note": "tiny test set"}))
    return root


NAMES, SEVERITIES = ("gaussian_noise", "elastic_transform"), (1, 3)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != DONE_NAME}


def test_builder_layout_masks_and_pixels(tiny_root, tmp_path):
    out = tmp_path / "corrupted"
    cells = build_corrupted_set(tiny_root, out, names=NAMES, severities=SEVERITIES, seed=3, workers=1,
                                progress=False)
    assert set(cells) == {(n, s) for n in NAMES for s in SEVERITIES}
    clean = sorted(p.relative_to(tiny_root).with_suffix(".png").as_posix() for p in tiny_root.rglob("*/image/*"))
    for (name, severity), cell in cells.items():
        assert cell == out / name / str(severity)
        assert (cell / "dataset_card.json").read_bytes() == (tiny_root / "dataset_card.json").read_bytes()
        assert sorted(p.relative_to(cell).as_posix() for p in cell.rglob("*/image/*")) == clean
        key = json.loads((cell / DONE_NAME).read_text())["key"]
        assert (key["corruption"], key["severity"], key["seed"]) == (name, severity, 3)
        for index, rel in enumerate(clean):
            source = next((tiny_root / rel).parent.glob(Path(rel).stem + ".*"))
            mask_rel = rel.replace("/image/", "/mask/")
            clean_mask = Image.open(tiny_root / mask_rel)
            expected, expected_mask = corrupt(np.asarray(Image.open(source).convert("RGB")), name, severity,
                                              image_seed(3, name, index), mask=np.asarray(clean_mask))
            assert np.array_equal(np.asarray(Image.open(cell / rel)), expected)
            written_mask = Image.open(cell / mask_rel)
            assert written_mask.mode == clean_mask.mode  # a palette mask stays a palette mask
            assert np.array_equal(np.asarray(written_mask), expected_mask)
            if name in GEOMETRIC:
                assert not np.array_equal(expected_mask, np.asarray(clean_mask))
            else:  # photometric: the very same file
                assert (cell / mask_rel).read_bytes() == (tiny_root / mask_rel).read_bytes()


def test_builder_output_reads_as_a_dataset_root(tiny_root, tmp_path):
    from endoarss_lib.data import get_spec, index_split

    cells = build_corrupted_set(tiny_root, tmp_path / "c", names=("smoke",), severities=(2,), workers=1,
                                progress=False)
    samples = index_split(cells[("smoke", 2)], "test", get_spec("mtlesd"))
    assert [s.label for s in samples] == [0, 1, 2] and all(s.mask.is_file() for s in samples)


def test_builder_rerun_skips_finished_cells(tiny_root, tmp_path):
    out = tmp_path / "corrupted"
    build_corrupted_set(tiny_root, out, names=NAMES, severities=SEVERITIES, workers=1, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    build_corrupted_set(tiny_root, out, names=NAMES, severities=SEVERITIES, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    assert not list(out.rglob("*.tmp"))


def test_builder_worker_count_does_not_change_bytes(tiny_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    build_corrupted_set(tiny_root, one, names=NAMES, severities=SEVERITIES, seed=5, workers=1, progress=False)
    build_corrupted_set(tiny_root, two, names=NAMES, severities=SEVERITIES, seed=5, workers=2, chunksize=1,
                        progress=False)
    assert _files(one) == _files(two) and len(_files(one)) == 2 * 2 * 7


def test_builder_seed_and_data_change_the_key(tiny_root, tmp_path):
    out = tmp_path / "corrupted"
    build_corrupted_set(tiny_root, out, names=("gaussian_noise",), severities=(2,), seed=0, workers=1,
                        progress=False)
    cell = out / "gaussian_noise" / "2"
    before, key0 = _files(cell), json.loads((cell / DONE_NAME).read_text())["key"]
    build_corrupted_set(tiny_root, out, names=("gaussian_noise",), severities=(2,), seed=1, workers=1,
                        progress=False)
    key1 = json.loads((cell / DONE_NAME).read_text())["key"]
    assert key1 != key0 and key1["seed"] == 1
    assert _files(cell) != before
    image = next(tiny_root.rglob("*/image/a.png"))
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(image)  # new data: rebuilt under a new fingerprint
    build_corrupted_set(tiny_root, out, names=("gaussian_noise",), severities=(2,), seed=1, workers=1,
                        progress=False)
    assert json.loads((cell / DONE_NAME).read_text())["key"]["dataset"] != key1["dataset"]


def test_builder_resizes_to_the_evaluation_size(tiny_root, tmp_path):
    cells = build_corrupted_set(tiny_root, tmp_path / "c", names=("contrast",), severities=(1,), image_size=40,
                                workers=1, progress=False)
    cell = cells[("contrast", 1)]
    for path in cell.rglob("*.png"):
        assert Image.open(path).size == (40, 40)
    masks = [np.asarray(Image.open(p)) for p in cell.rglob("*/mask/*.png")]
    assert all(set(np.unique(m)) <= {0, 1, 2, 3} for m in masks)


def test_builder_errors(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="name='fog'"):
        build_corrupted_set(tiny_root, tmp_path / "c", names=("fog",), progress=False)
    with pytest.raises(ValueError, match="workers=0"):
        build_corrupted_set(tiny_root, tmp_path / "c", workers=0, progress=False)
    with pytest.raises(ValueError, match="chunksize=0"):
        build_corrupted_set(tiny_root, tmp_path / "c", chunksize=0, progress=False)
    with pytest.raises(ValueError, match="must not lie inside the split"):
        build_corrupted_set(tiny_root, tiny_root / "test" / "corrupted", progress=False)
    with pytest.raises(ValueError, match="split folder missing"):
        build_corrupted_set(tiny_root, tmp_path / "c", split="train", progress=False)
    next(tiny_root.rglob("*/mask/a.png")).unlink()
    with pytest.raises(ValueError, match=r"a.png: no mask"):
        build_corrupted_set(tiny_root, tmp_path / "c", progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_builder_failure_names_the_file_and_leaves_no_marker(tiny_root, tmp_path, workers):
    next(tiny_root.rglob("*/image/b.jpg")).write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match=r"b\.jpg: contrast severity 1 failed"):
        build_corrupted_set(tiny_root, tmp_path / "c", names=("contrast",), severities=(1,), workers=workers,
                            chunksize=1, progress=False)
    assert not list((tmp_path / "c").rglob(DONE_NAME)) and not list((tmp_path / "c").rglob("*.tmp"))
