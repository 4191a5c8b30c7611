"""endoarss-predict (a trained run on one's own frames) and endoarss-evaluate --run (a run folder on its own or
another dataset), on a tiny run trained once for the module.

The references are independent of the prediction path: the model's own forward on the tensors the training data
pipeline gives (``MTLDataset``), resized back with ``F.interpolate`` here; the evaluation pass of the training
engine (``evaluate_run``'s per-image predictions and confusion matrices); the run's own ``result.json``.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from endoarss_lib import evaluate as evaluate_cli
from endoarss_lib.config import preset
from endoarss_lib.data import MTLDataset, make_synthetic
from endoarss_lib.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from endoarss_lib.data.registry import get_spec
from endoarss_lib.evaluation import predict as predict_cli
from endoarss_lib.evaluation.inference import evaluate_run, load_run_model
from endoarss_lib.evaluation.loading import load_inference_model
from endoarss_lib.data.dataset import JointTransform
from endoarss_lib.evaluation.predict import class_palette, model_input, overlay, predict_source
from endoarss_lib.training.engine import fit, read_run_config

SIZE = 56
N_TEST = 6


def train_tiny_run(root: Path) -> tuple[Path, Path]:
    """(data folder, run folder): a few 56 px synthetic images (read as real data) and a 1-epoch run of the test-size
    ViT on them."""
    data = make_synthetic(root / "data", "mtlesd", seed=0, n_train=12, n_test=N_TEST, image_size=SIZE)
    cfg = preset("smoke", data_root=str(data), synthetic=False, out_dir=str(root / "runs"), run_name="run",
                 image_size=SIZE, epochs=1, batch_size=6, progress=False,
                 model={"backbone": "vit_tiny_patch14", "pretrained": False})
    fit(cfg)
    return data, root / "runs" / "run"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data, run = train_tiny_run(root)
    frames = root / "frames"  # the test images, flat, under their own names
    frames.mkdir()
    test = MTLDataset(data, "test", dataset="mtlesd", image_size=SIZE)
    for sample in test.samples:
        shutil.copy(sample.image, frames / sample.image.name)
    return {"data": data, "run": run, "frames": frames, "model": load_inference_model(run, "cpu")}


def run_main(module, *argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = module.main([str(a) for a in argv])
    return code, err.getvalue()


def read_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "activities.csv", dtype={"frame": str})


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------------------------ folders of frames

def test_masks_and_activities_are_the_models_own_predictions(tiny, tmp_path):
    out = tmp_path / "out"
    summary = predict_source(tiny["run"], tiny["frames"], out, batch_size=N_TEST, device="cpu")
    test = MTLDataset(tiny["data"], "test", dataset="mtlesd", image_size=SIZE,
                      normalize=read_run_config(tiny["run"]).input_normalization())
    names = [s.image.stem for s in test.samples]
    assert names == sorted(names) and summary["frames"] == N_TEST  # the frames' order is the dataset's
    model = load_run_model(tiny["run"])
    with torch.no_grad():
        logits = model(torch.stack([test[i]["image"] for i in range(len(test))]))
    num_classes = logits["seg"].shape[1]
    frame_size = read_image_size(tiny["frames"] / test.samples[0].image.name)
    expected = F.interpolate(logits["seg"], size=frame_size, mode="bilinear", align_corners=False).argmax(1).numpy()
    masks = np.stack([read_mask(out / "masks" / f"{n}.png") for n in names])
    assert masks.shape == expected.shape and masks.dtype == np.uint8
    assert masks.max() < num_classes
    assert len(np.unique(masks)) > 1  # not a constant prediction: the comparison below means something
    np.testing.assert_array_equal(masks, expected)

    # the training engine's evaluation pass on the same images: predicted activities, probabilities, pixel counts
    ev = evaluate_run(tiny["run"], "test", distances=False, per_image_arrays=True)
    table = read_table(out)
    assert list(table["frame"]) == names
    np.testing.assert_array_equal(table["activity_id"].to_numpy(), ev.arrays["cls_pred"])
    activities = list(summary["activities"])
    np.testing.assert_allclose(table[[f"p_{a}" for a in activities]].to_numpy(), ev.arrays["cls_prob"], atol=1e-6)
    assert list(table["activity"]) == [activities[k] for k in ev.arrays["cls_pred"]]
    predicted_counts = ev.arrays["seg_confusion"].sum(1)  # columns: predicted class, over every (unignored) pixel
    np.testing.assert_array_equal(predicted_counts,
                                  np.stack([np.bincount(m.ravel(), minlength=num_classes) for m in masks]))


def read_image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def test_frames_of_other_sizes_get_masks_of_their_own_size(tiny, tmp_path):
    frames = tmp_path / "frames"
    (frames / "sub").mkdir(parents=True)
    source = sorted(tiny["frames"].glob("*.png"))[0]
    big = Image.open(source).convert("RGB").resize((100, 80), Image.BILINEAR)  # width 100, height 80
    big.save(frames / "sub" / "wide.png")
    big.save(frames / "wide.jpg", quality=95)
    out = tmp_path / "out"
    predict_source(tiny["model"], frames, out, recursive=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    model = load_run_model(tiny["run"])
    for name, path in (("sub/wide", frames / "sub" / "wide.png"), ("wide", frames / "wide.jpg")):
        rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        x = (TF.resize(rgb, [SIZE, SIZE], InterpolationMode.BILINEAR, antialias=True).float() / 255 - mean) / std
        with torch.no_grad():
            seg = model(x[None])["seg"]
        expected = F.interpolate(seg, size=(80, 100), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        mask = read_mask(out / "masks" / f"{name}.png")
        assert mask.shape == (80, 100)
        np.testing.assert_array_equal(mask, expected)
        overlay_png = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert overlay_png.shape == (80, 100, 3)
    table = read_table(out)
    assert list(table["frame"]) == ["sub/wide", "wide"]  # natural order of the relative paths


def test_csv_rows_are_probability_distributions_named_by_the_dataset(tiny, tmp_path):
    out = tmp_path / "out"
    predict_source(tiny["model"], tiny["frames"], out, batch_size=4)
    table = read_table(out)
    activities = get_spec("synthetic_mtlesd").activities  # the run's data are the synthetic ESD preset
    columns = [f"p_{a}" for a in activities]
    assert list(table.columns) == ["frame", "activity", "activity_id", *columns]
    probs = table[columns].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs >= 0).all()
    assert list(table["activity"]) == [activities[k] for k in probs.argmax(1)]
    record = json.loads((out / "prediction.json").read_text())
    assert record["frames"] == N_TEST and record["normalize"] == "imagenet" and record["image_size"] == SIZE
    assert record["seg_classes"] == list(get_spec("synthetic_mtlesd").seg_classes)


def test_overlay_blends_the_palette_and_leaves_background():
    from endoarss_lib.experiments.viz import class_palette as notebook_palette

    np.testing.assert_array_equal(class_palette(25), notebook_palette(25))  # the notebooks' colours
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    palette = class_palette(4)
    shown = overlay(image, mask, palette, alpha=0.25)
    assert (shown[mask == 0] == 100).all()
    for k in (1, 2, 3):
        expected = np.round(0.75 * 100 + 0.25 * palette[k].astype(float)).astype(np.uint8)
        assert (shown[mask == k] == expected).all()


# ------------------------------------------------------------------------------------------------ videos

def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frames[0].shape[1], frames[0].shape[0]))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.parametrize("every,kept", [(1, list(range(7))), (3, [0, 3, 6]), (5, [0, 5])])
def test_a_video_gives_one_row_per_kept_frame(tiny, tmp_path, every, kept):
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(tiny["frames"].glob("*.png"))]
    video = write_video(tmp_path / "clip.avi", [images[i % len(images)] for i in range(7)])
    out = tmp_path / "out"
    summary = predict_source(tiny["model"], video, out, every=every, video="overlay.mp4")
    table = read_table(out)
    assert list(table["frame"]) == [f"frame_{i:06d}" for i in kept]
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == list(table["frame"])
    written = cv2.VideoCapture(str(out / "overlay.mp4"))
    count = 0
    while written.read()[0]:
        count += 1
    written.release()
    assert count == len(kept) and summary["video_fps"] == pytest.approx(5.0 / every)


# ------------------------------------------------------------------------------------------------ bad inputs

def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    run, frames = tiny["run"], tiny["frames"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(predict_cli, run, empty, "--out", tmp_path / "o1")
    assert code == 1 and str(empty) in err and "no frames" in err and "Traceback" not in err

    nested = tmp_path / "nested" / "day1"
    nested.mkdir(parents=True)
    shutil.copy(next(frames.glob("*.png")), nested / "a.png")
    code, err = run_main(predict_cli, run, nested.parent, "--out", tmp_path / "o2")
    assert code == 1 and "--recursive" in err

    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    code, err = run_main(predict_cli, run, broken, "--out", tmp_path / "o3")
    assert code == 1 and str(broken) in err and "cannot be read as a video" in err

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "config.json", unfinished / "config.json")
    code, err = run_main(predict_cli, unfinished, frames, "--out", tmp_path / "o4")
    assert code == 1 and str(unfinished / "best.pt") in err and "rerun the same endoarss-train command" in err

    code, err = run_main(predict_cli, tmp_path / "nowhere", frames, "--out", tmp_path / "o5")
    assert code == 1 and str(tmp_path / "nowhere") in err

    (tmp_path / "o6").mkdir()
    (tmp_path / "o6" / "keep.txt").write_text("mine")
    code, err = run_main(predict_cli, run, frames, "--out", tmp_path / "o6")
    assert code == 2 and "--overwrite" in err and (tmp_path / "o6" / "keep.txt").read_text() == "mine"

    code, err = run_main(predict_cli, run, frames, "--out", tmp_path / "o7", "--every", "0")
    assert code == 2 and "--every 0" in err
    code, err = run_main(predict_cli, run, frames, "--out", tmp_path / "o8", "--video", "x.gif")
    assert code == 2 and "--video x.gif" in err
    for o in ("o1", "o2", "o3", "o4", "o5", "o7", "o8"):
        assert not (tmp_path / o).exists()  # a refused run writes nothing


def test_an_interrupted_run_leaves_whole_files_only(tiny, tmp_path, monkeypatch):
    from endoarss_lib.evaluation import predict as module

    calls = {"n": 0}
    real = module.read_image

    def interrupted(path):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(module, "read_image", interrupted)
    out = tmp_path / "out"
    code, err = run_main(predict_cli, tiny["run"], tiny["frames"], "--out", out, "--batch-size", "1", "--video",
                         "v.mp4")
    assert code == 130 and "interrupted" in err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len([f for f in files if f.startswith("masks/")]) == 3
    assert all(f.startswith(("masks/", "overlays/")) for f in files), files  # no CSV, record, video or temporary
    for f in files:
        Image.open(out / f).load()  # every written PNG is whole


# ------------------------------------------------------------------------------------------------ evaluate --run

def test_evaluate_a_run_folder_reproduces_its_test_metrics(tiny, tmp_path):
    run = tiny["run"]
    recorded = json.loads((run / "result.json").read_text())
    out = tmp_path / "own.json"
    code, err = run_main(evaluate_cli, "--run", run, "--out", out)
    assert code == 0, err
    row = json.loads(out.read_text())
    keys = [k for k in recorded if k.startswith("test_") and isinstance(recorded[k], float)]
    assert len(keys) > 10
    for key in keys:
        assert row[key] == pytest.approx(recorded[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert row["source"] == "evaluate" and row["same_data_as_run"] is True and row["n_images"] == N_TEST
    assert row["config_hash"] == recorded["config_hash"] and row["run_dir"] == str(run)
    assert row["data_fingerprint"]["test"] == recorded["data_fingerprint"]["test"]

    # the same images as another dataset's folder (no dataset card: read as real MTLESD), through --data-root
    other = Path(shutil.copytree(tiny["data"], tmp_path / "as_real"))
    (other / "dataset_card.json").unlink()
    out = tmp_path / "other.json"
    code, err = run_main(evaluate_cli, "--run", run, "--dataset", "mtlesd", "--data-root", other, "--out", out)
    assert code == 0, err
    row = json.loads(out.read_text())
    assert row["dataset"] == "mtlesd" and row["data"] == "real" and row["evaluated_on"] == str(other)
    for key in keys:
        assert row[key] == pytest.approx(recorded[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert "test_seg_miou_eval" in row  # the dataset's evaluated subset


def test_evaluate_a_run_folder_errors(tiny, tmp_path):
    run = tiny["run"]
    other = Path(shutil.copytree(tiny["data"], tmp_path / "as_real"))
    (other / "dataset_card.json").unlink()
    code, err = run_main(evaluate_cli, "--run", run, "--dataset", "mtlendovis", "--data-root", other)
    assert code == 2 and "mtlendovis" in err and "classes" in err and "Traceback" not in err
    code, err = run_main(evaluate_cli, "--run", run, "--dataset", "mtlendovis")
    assert code == 2 and "--data-root" in err
    code, err = run_main(evaluate_cli, "--run", tmp_path / "nowhere")
    assert code == 1 and str(tmp_path / "nowhere") in err
    code, err = run_main(evaluate_cli, "--random-init")
    assert code == 2 and "--data-root" in err


def test_a_third_task_is_written_by_its_registry_entry(tiny, tmp_path):
    # instrument presence (multi-label): its columns come from the task's frame_output / frame_column, named by the
    # dataset's instruments, and are sigmoid probabilities of the model's own logits (not a distribution)
    cfg = preset("smoke", synthetic_n_train=12, synthetic_n_test=4, out_dir=str(tmp_path / "runs"),  # instruments
                 run_name="presence", image_size=SIZE, epochs=1, batch_size=6, progress=False,  # are declared
                 model={"backbone": "vit_tiny_patch14", "pretrained": False, "tasks": ["cls", "seg", "presence"]})
    fit(cfg)
    model = load_inference_model(tmp_path / "runs" / "presence", "cpu")
    assert model.instruments, "the synthetic spec declares instrument classes"
    out = tmp_path / "out"
    predict_source(tmp_path / "runs" / "presence", tiny["frames"], out, device="cpu", progress=False)
    table = read_table(out)
    present = [f"present_{name}" for name in model.instruments]
    assert [c for c in table.columns if c.startswith("present_")] == present
    transform = JointTransform(SIZE, normalize=model.normalize)
    first = sorted(tiny["frames"].iterdir())[0]
    x = model_input(np.asarray(Image.open(first).convert("RGB")), transform)[None]
    with torch.no_grad():
        expected = torch.sigmoid(model(x)["presence"][0].float()).numpy()
    np.testing.assert_allclose(table.loc[table["frame"] == first.stem, present].to_numpy()[0], expected, atol=1e-5)
    assert list(table.columns[:3]) == ["frame", "activity", "activity_id"]  # the label task as before
    assert (out / "masks").is_dir()
