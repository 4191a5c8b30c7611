"""Command line: a trained model on one's own frames (a folder of images, one image, or a video).

    endoarss-predict MODEL SOURCE --out DIR [--every N] [--recursive] [--video overlay.mp4] [--batch-size 8]
                     [--device auto] [--image-size N] [--alpha 0.5] [--fps F] [--overwrite] [--no-progress]

MODEL is a run folder written by ``endoarss-train`` (its ``config.json`` and selected ``best.pt``), a run's
checkpoint file beside its ``config.json``, or a model exported by ``endoarss-export`` (``model.pt2`` with its record
``model.json``, or their folder). SOURCE is a folder of frames (``.png`` / ``.jpg`` / ``.jpeg``, in natural order:
``frame2`` before ``frame10``; ``--recursive`` also reads sub-folders), one image, or a video file read with OpenCV
(every ``--every``-th frame, from the first).

Each frame is read as RGB, resized to the model's side (``--image-size``, default the run's ``image_size``; bilinear,
antialiased) and normalised as in training (the run's ``input_normalization()``: the weights record's mean and std);
segmentation logits are resized back to the frame's size (bilinear) before the arg-max. Written into ``--out``:

* ``masks/<frame>.png``: the predicted class id of every pixel (8-bit grey PNG, the frame's size);
* ``overlays/<frame>.png``: the frame with the predicted classes blended in (background left as it is);
* ``activities.csv``: one row per frame: ``frame``, ``activity`` (the predicted name), ``activity_id`` and one
  probability column ``p_<activity>`` per activity (the softmax; each row sums to 1);
* ``prediction.json``: what ran on what (model, source, sizes, class names, the overlay palette, counts);
* with ``--video NAME.mp4`` (or ``.avi``; relative to ``--out``): the overlays as a video.

Every file is written atomically (an interrupted run leaves whole files only; ``activities.csv`` and
``prediction.json`` appear when all frames are done). Exit status: 0 done, 1 a model or source that cannot be used
(the message names it and says what to do), 2 a bad option, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from ..cli import add_standard_options, prog, run_command
from ..coerce import ConfigError
from ..data import DataError
from ..data.dataset import JointTransform
from ..data.io import IMAGE_SUFFIXES, read_image
from ..models.weights import WeightsError
from ..training.engine import CheckpointMismatch, RunError, autocast
from ..tasks import get_task
from ..version import __version__
from .loading import InferenceModel, load_inference_model

__all__ = ["predict_source", "iter_frames", "count_frames", "predict_frames", "class_palette", "overlay", "main",
           "PALETTE", "VIDEO_SUFFIXES"]

# Overlay colours (RGB), class k -> PALETTE[(k - 1) % len] for k >= 1, background black: matplotlib's tab20 in the
# order endoarss_lib.experiments.viz.class_palette uses (the notebooks' figures have the same colours).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229))
VIDEO_SUFFIXES = {".mp4": "mp4v", ".avi": "MJPG"}  # what --video writes (OpenCV's fourcc for the container)
DEFAULT_FOLDER_FPS = 10.0


def class_palette(num_classes: int, spec=None) -> np.ndarray:
    """(num_classes, 3) uint8 overlay colours: the dataset spec's ``class_colours`` where it has them, else black
    background and :data:`PALETTE`."""
    colours = getattr(spec, "class_colours", None) if spec is not None else None
    if colours is not None and len(colours) >= num_classes:
        return np.asarray(colours[:num_classes], np.uint8)
    return np.asarray([(0, 0, 0)] + [PALETTE[k % len(PALETTE)] for k in range(num_classes - 1)], np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An RGB uint8 frame with the colours of ``mask``'s classes blended in at ``alpha`` (background 0 untouched)."""
    out = image.astype(np.float32)
    shown = mask > 0
    out[shown] = (1 - alpha) * out[shown] + alpha * palette[mask[shown]].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ sources

def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.as_posix())]


def _frame_files(folder: Path, recursive: bool) -> list[Path]:
    found = (folder.rglob("*") if recursive else folder.iterdir())
    files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: _natural_key(p.relative_to(folder)))


def _frame_names(folder: Path, files: list[Path]) -> list[str]:
    """Output names (relative path without suffix); two frames that would share one is a DataError naming both."""
    names: dict[str, Path] = {}
    for f in files:
        name = f.relative_to(folder).with_suffix("").as_posix()
        if name in names:
            raise DataError(f"{names[name]} and {f}: two frames share the name {name!r} (their masks would overwrite "
                            f"each other); rename one, or move it to another folder")
        names[name] = f
    return list(names)


def _open_video(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise DataError(f"{path}: cannot be read as a video (OpenCV {cv2.__version__} could not open it: a damaged "
                        f"or incomplete file, not a video, or a codec this OpenCV build lacks). Convert it (e.g. "
                        f"ffmpeg -i {path.name} -c:v libx264 out.mp4), or extract its frames to a folder of PNG "
                        f"images and pass the folder")
    return capture


def _check_source(source: Path, recursive: bool) -> None:
    if not source.exists():
        raise DataError(f"{source}: no such file or folder; expected a folder of frames (png/jpg), an image or a "
                        f"video file")
    if source.is_dir() and not _frame_files(source, recursive):
        deeper = ("" if recursive or not _frame_files(source, True)
                  else "; its sub-folders hold some: pass --recursive to read them")
        where = " in it or below it" if recursive else " in it"
        raise DataError(f"{source}: no frames (expected {'/'.join(IMAGE_SUFFIXES)} files{where}){deeper}")


def count_frames(source: str | Path, every: int = 1, recursive: bool = False) -> int | None:
    """How many frames :func:`iter_frames` yields (a video's from its header: may be approximate; None unknown)."""
    source = Path(source)
    if source.is_dir():
        return len(_frame_files(source, recursive))
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return 1
    capture = _open_video(source)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return -(-total // every) if total > 0 else None


def iter_frames(source: str | Path, every: int = 1, recursive: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, RGB uint8 (H, W, 3))`` of every frame of ``source``: a folder's images in natural order (their
    relative paths without suffix as names), one image, or every ``every``-th frame of a video (``frame_000000``,
    numbered by the frame's index in the video). DataError naming the file for an empty folder, an unreadable image
    or a video that cannot be read."""
    source = Path(source)
    if every < 1:
        raise ConfigError(f"--every {every}: expected an int >= 1 (the frame stride: 1 = every frame)")
    _check_source(source, recursive)
    if source.is_dir():
        files = _frame_files(source, recursive)
        for name, f in zip(_frame_names(source, files), files):
            yield name, read_image(f)
        return
    if source.suffix.lower() in IMAGE_SUFFIXES:
        yield source.stem, read_image(source)
        return
    capture = _open_video(source)
    index, given = 0, 0
    try:
        while True:
            ok = capture.grab()
            if not ok:
                break
            if index % every == 0:
                ok, bgr = capture.retrieve()
                if not ok or bgr is None:
                    raise DataError(f"{source}: frame {index} cannot be decoded (damaged video?); convert the video "
                                    f"or extract its frames to a folder")
                given += 1
                yield f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if given == 0:
        raise DataError(f"{source}: the video holds no frame OpenCV can decode (empty, truncated, or a codec this "
                        f"OpenCV build lacks); convert it (e.g. ffmpeg -i {source.name} -c:v libx264 out.mp4) or "
                        f"extract its frames to a folder")


def _video_fps(source: Path, every: int) -> float | None:
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        return None
    capture = _open_video(source)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return fps / every if fps and fps > 0 else None


# ------------------------------------------------------------------------------------------------ the model

@dataclass
class FramePrediction:
    """One frame's prediction: its name, the frame (RGB), each task's outputs at the frame's size (by the task's
    ``frame_output``: ``masks`` of the mask tasks, ``probs`` of the label / labels tasks)."""

    name: str
    image: np.ndarray
    masks: dict  # task -> (H, W) uint8 class ids
    probs: dict  # task -> (K,) probabilities (softmax for a label task, sigmoid for a labels task)

    @property
    def mask(self) -> np.ndarray | None:
        """The first mask task's mask (None without one)."""
        return next(iter(self.masks.values()), None)


def _batches(frames: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def model_input(image: np.ndarray, transform: JointTransform) -> torch.Tensor:
    """An RGB uint8 (H, W, 3) frame as the model's input (3, s, s): the training pipeline's resize and normalisation
    (:class:`endoarss_lib.data.dataset.JointTransform` without augmentation)."""
    array = np.ascontiguousarray(image)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy()).permute(2, 0, 1)
    resized, _ = transform.geometry(tensor, torch.zeros((1, *tensor.shape[-2:]), dtype=torch.uint8))
    return transform.to_model(resized, None)[0]


@torch.no_grad()
def predict_frames(model: InferenceModel, frames: Iterable[tuple[str, np.ndarray]], batch_size: int = 8,
                   image_size: int | None = None) -> Iterator[FramePrediction]:
    """Run ``model`` over ``(name, RGB frame)`` pairs in batches; segmentation logits are resized back to each
    frame's size (bilinear) before the arg-max."""
    transform = JointTransform(image_size or model.image_size, normalize=model.normalize)
    for batch in _batches(frames, batch_size):
        x = torch.stack([model_input(image, transform) for _, image in batch]).to(model.device)
        with autocast(model.device, model.amp):
            out = model(x)
        for i, (name, image) in enumerate(batch):
            masks, probs = {}, {}
            for task in model.tasks:
                if task not in out:
                    continue
                if get_task(task).frame_output == "mask":
                    logits = F.interpolate(out[task][i:i + 1].float(), size=image.shape[:2], mode="bilinear",
                                           align_corners=False)
                    masks[task] = logits[0].argmax(0).to(torch.uint8).cpu().numpy()
                else:
                    probs[task] = get_task(task).frame_probabilities(out[task][i]).cpu().numpy()
            yield FramePrediction(name, image, masks, probs)


# ------------------------------------------------------------------------------------------------ writing

def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


class _VideoOut:
    """The overlay video, written to a hidden temporary file beside its target and renamed into place when whole
    (removed on error); frames of another size than the first are resized to it."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.writer = self.tmp = self.size = None
        self.resized = 0

    def add(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.",
                                       suffix=f".tmp{self.path.suffix}")
            os.close(fd)
            self.tmp, self.size = Path(tmp), (rgb.shape[1], rgb.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_SUFFIXES[self.path.suffix.lower()])
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                raise RunError(f"{self.path}: OpenCV {cv2.__version__} cannot write this video (codec "
                               f"{VIDEO_SUFFIXES[self.path.suffix.lower()]!r}); try --video overlay.avi")
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
            self.resized += 1
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.release()
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.tmp.unlink(missing_ok=True)


@contextmanager
def _video(path: Path | None, fps: float) -> Iterator[_VideoOut | None]:
    if path is None:
        yield None
        return
    video = _VideoOut(path, fps)
    try:
        yield video
    except BaseException:
        video.abandon()
        raise
    video.finish()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder (created if missing)")
    if out.is_dir() and not overwrite and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ConfigError(f"--out {out}: the folder already holds files (left as they are); choose a new folder, or "
                          f"pass --overwrite to write over the predictions there")


def predict_source(model: str | Path | InferenceModel, source: str | Path, out: str | Path, *, every: int = 1,
                   recursive: bool = False, batch_size: int = 8, device: str = "auto", image_size: int | None = None,
                   video: str | Path | None = None, fps: float | None = None, alpha: float = 0.5,
                   overwrite: bool = False, progress: bool | None = None) -> dict:
    """Predict every frame of ``source`` with ``model`` (see the module docstring) and write the outputs into
    ``out``; returns the summary written as ``prediction.json``."""
    start = time.perf_counter()
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected an int >= 1")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha {alpha}: expected a number in [0, 1] (0: frame only, 1: class colours only)")
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps {fps}: expected a number > 0")
    video_path = None
    if video is not None:
        video_path = Path(video).expanduser()
        video_path = video_path if video_path.is_absolute() else out / video_path
        if video_path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ConfigError(f"--video {video}: expected a file name ending in {' or '.join(VIDEO_SUFFIXES)}")
    if every < 1:
        raise ConfigError(f"--every {every}: expected an int >= 1 (the frame stride: 1 = every frame)")
    _check_out(out, overwrite)
    _check_source(source, recursive)
    total = count_frames(source, every, recursive)
    if not isinstance(model, InferenceModel):
        model = load_inference_model(model, device)
    size = model.image_size if image_size is None else int(image_size)
    if size < 14:
        raise ConfigError(f"--image-size {size}: expected an int >= 14 (the model's input side in pixels)")
    if model.fixed_size and size != model.image_size:
        raise ConfigError(f"--image-size {size}: this exported model takes {model.image_size} x {model.image_size} "
                          f"inputs only; leave --image-size out, or export the run again at that size")
    if size != model.image_size:
        warnings.warn(f"--image-size {size}: the model was trained at {model.image_size} px; predictions at another "
                      f"size may be worse", stacklevel=2)
    mask_tasks, label_tasks = model.tasks_of("mask"), model.tasks_of("label") + model.tasks_of("labels")
    if not mask_tasks and not label_tasks:
        raise ConfigError(f"the model's tasks {list(model.tasks)} give no mask and no image label: nothing to write")
    if len(mask_tasks) > 1:
        warnings.warn(f"the model has {len(mask_tasks)} mask tasks {list(mask_tasks)}: masks/ and overlays/ show the "
                      f"first ({mask_tasks[0]})", stacklevel=2)
    mask_names = model.class_names(mask_tasks[0]) if mask_tasks else ()
    single = len(model.tasks_of("label")) == 1  # one image-label task: its probabilities are p_<class>
    palette = class_palette(len(mask_names))
    fps = fps or _video_fps(source, every) or DEFAULT_FOLDER_FPS
    counts = {t: np.zeros(len(model.class_names(t)), np.int64) for t in model.tasks_of("label")}
    rows = []
    frames = iter_frames(source, every, recursive)
    bar = tqdm(total=total, desc="predict", unit="frame", disable=(not sys.stderr.isatty()) if progress is None
               else not progress)
    with _video(video_path, fps) as writer, bar:
        for pred in predict_frames(model, frames, batch_size, size):
            row = {"frame": pred.name}
            if pred.mask is not None:
                _save_png(out / "masks" / f"{pred.name}.png", pred.mask)
                shown = overlay(pred.image, pred.mask, palette, alpha)
                _save_png(out / "overlays" / f"{pred.name}.png", shown)
                if writer is not None:
                    writer.add(shown)
            elif writer is not None:
                writer.add(pred.image)
            for task, probs in pred.probs.items():
                stem, names = get_task(task).frame_column or task, model.class_names(task)
                names = names if len(names) == len(probs) else tuple(f"{task}_{k}" for k in range(len(probs)))
                if get_task(task).frame_output == "label":
                    k = int(probs.argmax())
                    counts[task][k] += 1
                    row.update({stem: names[k], f"{stem}_id": k})
                    prefix = "p_" if single else f"{stem}_p_"
                else:
                    prefix = f"{stem}_"
                row.update({f"{prefix}{name}": float(p) for name, p in zip(names, probs)})
            rows.append(row)
            bar.update(1)
    if writer is not None and writer.resized:
        warnings.warn(f"{video_path}: {writer.resized} frame(s) of another size than the first were resized to "
                      f"{writer.size[0]}x{writer.size[1]} in the video (their PNG outputs keep their own size)",
                      stacklevel=2)
    if label_tasks:
        write_text_atomic(out / "activities.csv", pd.DataFrame(rows).to_csv(index=False))
    summary = {
        "endoarss_version": __version__, "model": model.source, "source": str(source),
        "source_kind": "folder" if source.is_dir() else "image" if source.suffix.lower() in IMAGE_SUFFIXES
        else "video", "every": every, "recursive": recursive, "frames": len(rows), "image_size": size,
        "normalize": model.normalize, "device": str(model.device), "tasks": list(model.tasks),
        "activities": list(model.activities), "seg_classes": list(model.seg_classes),
        "palette": {name: [int(c) for c in palette[k]] for k, name in enumerate(mask_names)},
        "alpha": alpha,
        "predicted": {t: {name: int(n) for name, n in zip(model.class_names(t), c)} for t, c in counts.items()},
        "outputs": {"masks": "masks/" if mask_tasks else None,
                    "overlays": "overlays/" if mask_tasks else None,
                    "activities": "activities.csv" if label_tasks else None,
                    "video": None if video_path is None else str(video_path)},
        "video_fps": fps if video_path is not None else None,
        "wall_time_s": round(time.perf_counter() - start, 2)}
    write_json_atomic(out / "prediction.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("endoarss_lib.evaluation.predict", "endoarss-predict"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_standard_options(p)
    p.add_argument("model", help="a run folder (config.json + best.pt), a run's checkpoint beside its config.json, "
                                 "or an exported model.pt2 (beside model.json) or its folder")
    p.add_argument("source", help="a folder of frames (png/jpg), one image, or a video file")
    p.add_argument("--out", required=True, help="output folder (created; must be new or empty unless --overwrite)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="video: every N-th frame (default 1: all)")
    p.add_argument("--recursive", action="store_true", help="folder: also read the frames of its sub-folders")
    p.add_argument("--video", metavar="NAME.mp4", help="also write the overlays as a video (.mp4 or .avi; relative "
                                                      "to --out)")
    p.add_argument("--fps", type=float, help="frame rate of --video (default: the source video's / N, else 10)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: a GPU if any)")
    p.add_argument("--image-size", type=int, help="model input side in pixels (default: the run's image_size)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds files already")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    return p


def main(argv=None) -> int:
    """Entry point; prints where the outputs are; returns the exit status (0, 1, 2 or 130)."""
    args = _parser().parse_args(argv)
    return run_command(lambda: _run(args), debug=args.debug,
                       failures=(DataError, RunError, CheckpointMismatch, WeightsError, OSError),
                       usage=(ValueError, TypeError))


def _run(args) -> int:
    summary = predict_source(args.model, args.source, args.out, every=args.every, recursive=args.recursive,
                             batch_size=args.batch_size, device=args.device, image_size=args.image_size,
                             video=args.video, fps=args.fps, alpha=args.alpha, overwrite=args.overwrite,
                             progress=False if args.no_progress else None)
    shown = {t: {k: v for k, v in counts.items() if v} for t, counts in summary["predicted"].items()}
    print(f"{summary['frames']} frame(s) of {summary['source']} -> {Path(args.out).expanduser()}"
          + "".join(f"; {t} predicted: {c}" for t, c in shown.items() if c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
