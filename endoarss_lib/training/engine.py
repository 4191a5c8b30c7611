"""Training engine: ``fit(config)`` trains, selects an epoch, tests once, and writes a result row.

A run lives in ``<out_dir>/<run_name>/``: ``config.json``, ``last.pt`` (everything needed to resume, written
atomically after every epoch; deleted when the run finishes unless ``keep_last``), ``best.pt`` (the selected model),
``log.csv`` (per epoch), ``diagnostics.csv`` (task-gradient conflict, when enabled), ``routing.csv`` (per epoch and
task, a connector's routing statistics, when the model has one) and ``result.json`` (the result row).

One training step (:func:`train_step`) and one evaluation pass (:func:`evaluate`, which keeps its meters) serve the
engine, the benchmarks and the notebooks. Weighting methods and connectors reach the loop only through declared hooks
(``Weighting.observe`` / ``epoch_log``, ``model.reset_epoch_stats`` / ``epoch_stats``); what a task is (loss, meter,
metrics and their direction) comes from :mod:`endoarss_lib.tasks`.

Nothing a user made is lost: a run folder's config is checked against its checkpoints *before* anything is written;
every checkpoint records the pretrained weights' sha256 and the data's fingerprint, and resuming or reusing a
finished run checks both. Calling ``fit`` again with the same config resumes an interrupted run, or returns the
finished run's row.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..atomic import (LockHeld, atomic_path, folder_lock, remove_stale_temporaries, why_not_written, write_json_atomic,
                      write_text_atomic)
from ..config import ConfigError, TrainConfig, require_backbone_weights
from ..data import MTLDataset, make_loader, make_synthetic
from ..models import build_model_from_config
from ..models.pretrained import get_pretrained, is_pretrained_name, is_synthetic_pretrained
from ..models.weights import file_sha256, why_unreadable
from ..tasks import TASKS, add_targets, get_task, headline_keys, higher_is_better
from ..weighting import get_weighting
from .console import bars_wanted, duration, epoch_line, start_line
from .diagnostics import conflict_record, task_gradient_matrix
from .distributed import average_gradients, prepare_data_parallel, unwrap, uses_ddp
from .losses import make_cls_loss, task_losses
from .rows import ResultRow, read_row
from .tblog import TensorBoardLog, require_tensorboard

__all__ = ["fit", "evaluate", "Evaluation", "train_step", "make_datasets", "run_dir", "seed_everything",
           "build_run_model", "checkpoint_info", "COMPAT_SIZE", "describe_device",
           "resolve_device", "autocast", "native_bf16", "load_checkpoint", "read_checkpoint", "CheckpointMismatch",
           "RunError", "selection_score", "read_run_config", "weights_digest", "deterministic_algorithms",
           "read_per_image", "write_per_image", "PER_IMAGE_FILE"]

CHECKPOINT_VERSION = 2

log = logging.getLogger(__name__)  # endoarss_lib.training.engine: the run's start, epoch and end lines


class CheckpointMismatch(RuntimeError):
    """A checkpoint does not belong to the config, the weights or the data it is loaded for."""


class RunError(RuntimeError):
    """A run folder cannot be used as asked (another config's run, changed data, a damaged file)."""


# ------------------------------------------------------------------------------------------------ set-up

CUBLAS_WORKSPACE = ":4096:8"  # the cuBLAS workspace setting that makes its kernels deterministic (CUDA >= 10.2)


@contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Deterministic algorithms inside the block (``deterministic=true``): ``torch.use_deterministic_algorithms``,
    cuDNN without benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when CUDA initialises (a
    warning says so when CUDA was already in use: then export it before Python starts). The previous settings are
    restored after the block (the environment variable stays). ``enabled=False`` changes nothing."""
    if not enabled:
        yield
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_WORKSPACE, ":16:8"):
        if torch.cuda.is_initialized():
            warnings.warn("deterministic=true: CUDA was initialised in this process before CUBLAS_WORKSPACE_CONFIG was "
                          f"set, so cuBLAS may stay non-deterministic; export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} "
                          "before starting Python", stacklevel=3)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as given (a ConfigError if CUDA or that GPU is missing).
    For 'auto' the choice and its reason are logged (INFO the first time in a process, then DEBUG), and a WARNING
    says so once when a CUDA build of torch finds no GPU."""
    device, why = describe_device(name)
    if name == "auto":
        log.log(logging.DEBUG if why in _ANNOUNCED else logging.INFO, "device=auto: %s", why)
        _ANNOUNCED.add(why)
        _warn_if_no_gpu(name)
    return device


_ANNOUNCED: set[str] = set()  # device choices already logged at INFO in this process
_NO_GPU_WARNED: list[bool] = []


def _warn_if_no_gpu(name: str) -> None:
    """A WARNING (once per process) when ``device=auto`` falls back to the CPU although torch is a CUDA build: the
    GPU, its driver or ``CUDA_VISIBLE_DEVICES`` is likely wrong on this machine."""
    if name != "auto" or torch.cuda.is_available() or not torch.version.cuda or _NO_GPU_WARNED:
        return
    _NO_GPU_WARNED.append(True)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES is not set"
    log.warning("device=auto: torch %s is a CUDA %s build but finds no usable GPU (no GPU, no driver, or hidden by "
                "the environment: %s); running on the CPU, which is much slower. Set device=cpu to say that is "
                "intended", torch.__version__, torch.version.cuda, hint)


def describe_device(name: str) -> tuple[torch.device, str]:
    """:func:`resolve_device`'s device for ``name`` and why it was chosen, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3,
    auto: CUDA available)`` or ``cpu (auto: no CUDA device)``; nothing is logged. ConfigError as resolve_device."""
    if name == "auto":
        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            count = torch.cuda.device_count()
            return torch.device("cuda"), (f"cuda:{index} ({torch.cuda.get_device_name(index)}, auto: CUDA available"
                                          f"{f', {count} GPUs visible' if count > 1 else ''})")
        why = "no CUDA device" if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build"
        return torch.device("cpu"), f"cpu (auto: {why})"
    device = _explicit_device(name)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return device, f"cuda:{index} ({torch.cuda.get_device_name(index)}, device={name})"
    return device, f"{device} (device={name})"


def _explicit_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"{build}, no usable GPU or driver); use device=cpu, or device=auto to take a GPU when "
                          f"there is one")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} visible GPU(s) (cuda:0.."
                          f"cuda:{torch.cuda.device_count() - 1}); choose one of them or device=cuda")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast on ``device``: CUDA, or a CPU with AVX512-BF16 / AMX-BF16 instructions. On other
    CPUs PyTorch emulates bf16 and it is several times slower than fp32 (measured 3-5x on an AVX2 EPYC)."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, amp: str):
    """bf16 autocast when ``amp`` is 'bf16', or 'auto' on CUDA; a no-op context otherwise."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def make_datasets(cfg: TrainConfig, splits=("train", "val", "test")) -> dict[str, MTLDataset]:
    """The run's datasets (generating the synthetic set first when asked)."""
    root = cfg.data_root_path()
    if cfg.synthetic:
        make_synthetic(root, cfg.dataset, seed=cfg.synthetic_seed, n_train=cfg.synthetic_n_train,
                       n_test=cfg.synthetic_n_test, image_size=cfg.image_size)
    common = dict(dataset=cfg.dataset, image_size=cfg.image_size, val_fraction=cfg.val_fraction,
                  split_seed=cfg.split_seed, id_map=cfg.id_map, ignore_index=cfg.ignore_index,
                  normalize=cfg.input_normalization())
    datasets = {s: MTLDataset(root, s, augment=cfg.augment and s == "train", **common) for s in splits}
    if cfg.id_map == "released" and any(d.synthetic for d in datasets.values()):
        raise ConfigError(f"id_map='released' (raw k -> k-1, for the authors' 1-based masks) on {root}, which holds "
                          f"the project's synthetic data (its dataset card says so): their masks are 0-based, so "
                          f"every class would shift by one. Set id_map=null for this folder")
    if cfg.runtime_settings(_on_cuda(cfg))["data_cache"]:
        for dataset in datasets.values():
            dataset.use_cache(cfg.cache_dir, progress=bars_wanted(cfg.progress))
    return datasets


def _on_cuda(cfg: TrainConfig) -> bool:
    """Whether the run trains on CUDA (torchrun ranks included); never raises where CUDA is missing."""
    return torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")


def _loader(dataset, cfg: TrainConfig, shuffle: bool, epoch: int = 0, world: int = 1, rank: int = 0):
    run = cfg.runtime_settings(_on_cuda(cfg))  # workers, pinned memory: the device's defaults where left null
    return make_loader(dataset, cfg.batch_size, shuffle=shuffle, seed=cfg.seed, epoch=epoch,
                       num_workers=run["num_workers"], world=world, rank=rank, pin_memory=run["pin_memory"],
                       persistent_workers=run["persistent_workers"])


def _optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:
        scheduler = None
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------------ checkpoints

def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers (BatchNorm statistics); frozen backbone weights are not saved."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def _save(path: Path, obj: dict) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as "[enforce fail at inline_container.cc]"
        raise RunError(f"{path}: the checkpoint cannot be written: {why_not_written(path, exc)}. The run folder keeps "
                       f"its last complete checkpoint; rerunning the same command resumes from it") from None


def weights_digest(model) -> str | None:
    """sha256 of the model's pretrained weights file (None for a random-init backbone)."""
    return (getattr(model, "weights", None) or {}).get("sha256")


def _damaged_checkpoint_advice(path: Path) -> str:
    """What to do about an unreadable checkpoint, by its role in the run folder."""
    if path.name == "last.pt":
        return ("Move it away and rerun the same config: the run starts again from epoch 1 in the same folder (the "
                "other files are kept until they are rewritten)")
    if path.name == "best.pt":
        return ("The selected model cannot be rebuilt from the run folder: move the folder away (its result.json "
                "still holds the numbers) or train this config again under another run_name / out_dir")
    return "Check that it is a checkpoint written by endoarss_lib.training.engine.fit"


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`fit` (``weights_only=True``); RunError naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # empty, truncated zip, pickle of something else, ...
        raise RunError(f"{path}: not a readable endoarss checkpoint: {why_unreadable(path, exc)}. "
                       f"{_damaged_checkpoint_advice(path)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RunError(f"{path}: not an endoarss checkpoint (expected a dict with 'model', 'config_hash')")
    return ckpt


def load_checkpoint(path: str | Path, model: torch.nn.Module, config_hash: str | None = None,
                    weights_sha256: str | None | bool = False) -> dict:
    """Load a checkpoint into ``model``; CheckpointMismatch if it belongs to another config or other weights.

    ``weights_sha256``: the sha256 the model's pretrained weights must have (None = random init); ``False`` skips
    the check (checkpoints written before it existed carry no hash).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    if config_hash is not None and ckpt.get("config_hash") != config_hash:
        raise CheckpointMismatch(f"{path}: written for config {ckpt.get('config_hash')}, not {config_hash}; give "
                                 f"this config another run_name or out_dir (the run folder is kept as it is)")
    if weights_sha256 is not False and "weights_sha256" in ckpt and ckpt["weights_sha256"] != weights_sha256:
        source = (getattr(model, "weights", None) or {}).get("source", "the weights file")
        raise CheckpointMismatch(
            f"{path}: trained on pretrained weights with sha256 {ckpt['weights_sha256']}, but {source} now has "
            f"{weights_sha256}: the file at that path was replaced. Restore the original weights file there, or "
            f"train a new run (another run_name / out_dir); the run folder is kept as it is")
    expected = set(_trainable_state(model))
    missing, unexpected = sorted(expected - set(ckpt["model"])), sorted(set(ckpt["model"]) - expected)
    if missing or unexpected:
        raise CheckpointMismatch(f"{path}: does not match the model: missing {missing[:8]}, unexpected "
                                 f"{unexpected[:8]}")
    model.load_state_dict(ckpt["model"], strict=False)
    return ckpt


# ------------------------------------------------------------------------------------------------ evaluation

class Evaluation(dict):
    """The metrics of one evaluation pass (a dict ``{<task>_<metric>: float}``) with the pass's meters.

    ``meters[task]`` is the task's meter and ``values[task]`` its full ``compute()`` output (confusion matrices,
    per-class IoU / Dice / HD, ...); with ``per_image=True`` ``images`` holds one record per image (path, activity,
    correct or not, foreground IoU, per-class IoU), so per-class, per-activity and per-image results reuse one pass.
    """

    def __init__(self, metrics: dict, meters: dict, values: dict, images: list[dict] | None = None,
                 arrays: dict | None = None):
        super().__init__(metrics)
        self.meters, self.values, self.images = meters, values, images or []
        self.arrays = arrays or {}


def _per_image_outcomes(out: dict, batch: dict, tasks, ignore_index: int) -> dict[str, np.ndarray]:
    """Per-image outcomes of one batch, by the shape of each task's output and target (no task is named): one label
    per image -> ``<task>_true`` / ``<task>_pred`` (and ``<task>_prob``, the softmax); one label per pixel ->
    ``<task>_confusion`` (B, K, K), rows true, columns predicted, ignored pixels left out; a score per class
    (multi-label) -> ``<task>_true`` and ``<task>_score`` (sigmoid)."""
    arrays = {}
    for t in tasks:
        logits, target = out[t].float().detach().cpu(), batch[get_task(t).target].cpu()
        k = logits.shape[1]
        if target.ndim == logits.ndim:  # multi-label: a 0/1 target per class
            arrays[f"{t}_true"], arrays[f"{t}_score"] = target.numpy(), logits.sigmoid().numpy()
        elif logits.ndim == 2:
            arrays[f"{t}_true"], arrays[f"{t}_pred"] = target.numpy(), logits.argmax(1).numpy()
            arrays[f"{t}_prob"] = logits.softmax(1).numpy().astype(np.float32)
        else:
            pred = logits.argmax(1).reshape(len(target), -1)
            truth = target.reshape(len(target), -1).long()
            valid = (truth != ignore_index) & (truth >= 0) & (truth < k)
            conf = np.zeros((len(target), k, k), np.int64)
            for i in range(len(target)):
                idx = truth[i][valid[i]] * k + pred[i][valid[i]]
                conf[i] = torch.bincount(idx, minlength=k * k).reshape(k, k).numpy()
            arrays[f"{t}_confusion"] = conf
    return arrays


def _image_records(out: dict, batch: dict, num_classes: dict, ignore_index: int) -> list[dict]:
    """One record per image: path, activity label, and each task's per-image values (its ``image_record``)."""
    records = []
    n = batch["image"].shape[0]
    tasks = [get_task(t) for t in out if get_task(t).image_record is not None]
    for i in range(n):
        rec = {"path": batch.get("path", [None] * n)[i], "label": int(batch["label"][i])}
        for task in tasks:
            rec.update(task.image_record(out[task.name][i], batch[task.target][i], num_classes.get(task.name),
                                         ignore_index))
        records.append(rec)
    return records


def task_classes(tasks, spec=None, num_classes: dict | None = None, **counts) -> dict[str, int | None]:
    """``{task: class count}``: from ``num_classes``, else a count named by the task's ``classes_field``
    (``num_activities=``, ``num_seg_classes=``), else the dataset ``spec``."""
    out = {}
    for t in tasks:
        task = get_task(t)
        value = (num_classes or {}).get(t)
        if value is None:
            value = counts.get(task.classes_field)
        if value is None and spec is not None:
            value = task.num_classes(spec)
        out[t] = value
    return out


@torch.no_grad()
def evaluate(model, loader, device, tasks, num_activities: int | None = None, num_seg_classes: int | None = None,
             distances: bool = True, amp: str = "auto", ignore_index: int = 255, progress: bool = False,
             per_image: bool = False, compat_size: int | None = None, spec=None,
             num_classes: dict | None = None, per_image_arrays: bool = False) -> Evaluation:
    """Metrics of ``model`` over a whole loader: every metric the task registry declares, keys ``<task>_<metric>``.

    Class counts come from ``num_classes`` (``{task: count}``), the legacy ``num_activities`` /
    ``num_seg_classes``, or the dataset ``spec`` (default: the loader's dataset's), which also derives targets the
    batches do not hold (:func:`endoarss_lib.tasks.add_targets`). ``compat_size``: side of the label maps the
    ``compat_`` segmentation metrics are computed on (the released evaluation uses 244 x 244, nearest resizing of
    predictions and masks); None computes them at the input size. ``per_image_arrays``: also keep every image's
    outcome (:func:`_per_image_outcomes`, plus ``path``) in ``Evaluation.arrays``, in loader order (``fit`` writes
    them for the test split: ``test_per_image.npz``).
    """
    model.eval()
    spec = spec if spec is not None else getattr(getattr(loader, "dataset", None), "spec", None)
    classes = task_classes(tasks, spec, num_classes, num_activities=num_activities, num_seg_classes=num_seg_classes)
    meters = {t: get_task(t).make_meter(classes[t], ignore_index=ignore_index, distances=distances,
                                        compat_size=compat_size) for t in tasks}
    images: list[dict] = []
    chunks: list[dict] = []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with autocast(device, amp):
            out = model(batch["image"].to(device))
        batch = add_targets(batch, tasks, spec)
        for t, meter in meters.items():
            get_task(t).update_meter(meter, out[t], batch)
        if per_image:
            images += _image_records({t: out[t] for t in tasks}, batch, classes, ignore_index)
        if per_image_arrays:
            chunks.append(_per_image_outcomes(out, batch, tasks, ignore_index))
            chunks[-1]["path"] = np.array([str(p) for p in batch.get("path", [""] * len(batch["image"]))])
    values = {t: meter.compute() for t, meter in meters.items()}
    arrays = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    metrics = {}
    for t in tasks:
        metrics.update(get_task(t).result_values(values[t]))
    return Evaluation(metrics, meters, values, images, arrays)


def selection_score(metrics: dict, key: str) -> float:
    """The number model selection maximises: 'score' = mean of the trained tasks' headline metrics (accuracy and
    mIoU); any other result key is signed by its direction (HD: lower is better, so its negative is maximised)."""
    if key == "score":
        parts = [metrics[k] for k in headline_keys(TASKS) if k in metrics]
        value = float(np.mean(parts))
    else:
        value = float(metrics[key])
        value = value if higher_is_better(key) else -value
    return value if not np.isnan(value) else -float("inf")  # undefined (e.g. HD of an empty prediction): worst


# ------------------------------------------------------------------------------------------------ training

def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide peak RSS


def train_step(model, batch: dict, weighting, tasks, *, device=None, amp: str = "off",
               loss_weights: dict | None = None, grad_accum: int = 1, cls_loss=None, label_smoothing: float = 0.0,
               ignore_index: int = 255, shared=None, task_params=None, diagnostics: bool = False, spec=None,
               loss_fns: dict | None = None) -> dict:
    """One forward and the weighted backward of one batch (the optimiser step is the caller's).

    The weighting method sees the batch's outputs first (:meth:`Weighting.observe`), the model's regulariser
    (DSelect-k) is backpropagated, then ``weighting.backward`` combines the task losses (scaled by ``loss_weights``
    and ``1 / grad_accum``) into the gradients of the trainable shared parameters and the tasks' own parameters.
    ``spec``: the dataset spec, for tasks whose target is derived from the batch (:func:`~endoarss_lib.tasks.
    add_targets`); ``loss_fns``: ``{task: loss callable}`` replacing a task's own loss (``cls_loss``: the activity's).
    Returns ``{"losses": {task: float raw loss}, "weights": the method's task weights (detached), "outputs": ...,
    "diagnostics": conflict record or None}``.
    """
    raw_model = unwrap(model)  # the model inside torch.compile / DistributedDataParallel
    device = device or next(raw_model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch = add_targets(batch, tasks, spec)
    loss_weights = loss_weights or {}
    with autocast(device, amp):
        out = model(batch["image"])
    raw = task_losses(out, batch, tasks, ignore_index, label_smoothing, cls_loss=cls_loss, loss_fns=loss_fns)
    losses = torch.stack([raw[t] * loss_weights.get(t, 1.0) / grad_accum for t in tasks])
    record = None
    if diagnostics and len(tasks) > 1:
        grads, slices = task_gradient_matrix(losses, raw_model.named_trainable_shared_parameters())
        record = conflict_record(grads, slices)
    weighting.observe(out, batch, tasks, ignore_index)
    regulariser = raw_model.regularization_loss()
    if regulariser.requires_grad:
        regulariser.backward(retain_graph=True)  # DSelect-k's entropy term reaches its selectors
    shared = raw_model.trainable_shared_parameters() if shared is None else shared
    task_params = [raw_model.task_specific_parameters(t) for t in tasks] if task_params is None else task_params
    weights = weighting.backward(losses, shared, task_params)
    return {"losses": {t: float(raw[t].detach()) for t in tasks}, "weights": weights, "outputs": out,
            "diagnostics": record}


def _train_epoch(state: dict, loader, epoch: int, cfg: TrainConfig, rank: int, world: int) -> dict:
    model, raw_model, optimizer, weighting = state["model"], state["raw_model"], state["optimizer"], state["weighting"]
    tasks = cfg.tasks
    shared = raw_model.trainable_shared_parameters()
    heads = [raw_model.task_specific_parameters(t) for t in tasks]
    model.train()
    raw_model.reset_epoch_stats()
    weighting.set_epoch(epoch, cfg.epochs)
    sums, batches = {t: 0.0 for t in tasks}, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not bars_wanted(cfg.progress) or rank > 0)
    debug = rank == 0 and log.isEnabledFor(logging.DEBUG)
    for step, batch in enumerate(bar):
        state["global_step"] += 1
        diag = bool(cfg.diagnostics_every) and state["global_step"] % cfg.diagnostics_every == 0
        result = train_step(model, batch, weighting, tasks, device=state["device"], amp=cfg.amp,
                            loss_weights=cfg.loss_weights, grad_accum=cfg.grad_accum, cls_loss=state.get("cls_loss"),
                            label_smoothing=cfg.label_smoothing, ignore_index=cfg.ignore_index, shared=shared,
                            task_params=heads, diagnostics=diag, spec=state.get("spec"))
        bad = {t: v for t, v in result["losses"].items() if not math.isfinite(v)}
        if bad:  # before the optimiser step: the parameters stay those of the last finite step
            raise RunError(_diverged(cfg, epoch, step, state["global_step"],
                                     f"the loss is not finite for {_losses(bad)}"))
        if result["diagnostics"] is not None:
            state["diagnostics"].append({"epoch": epoch, "step": state["global_step"], **result["diagnostics"]})
        if state.get("tensorboard") is not None:
            state["tensorboard"].step(state["global_step"], result)
        if (step + 1) % cfg.grad_accum == 0 or step + 1 == len(loader):
            if world > 1 and not uses_ddp(model):  # DDP averaged them during the backward
                _all_reduce_grads(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for t in tasks:
            sums[t] += result["losses"][t]
        batches += 1
        bar.set_postfix({t: f"{sums[t] / batches:.3f}" for t in tasks})
        if debug:
            log.debug("epoch %d, batch %d/%d (step %d): loss %s", epoch + 1, step + 1, len(loader),
                      state["global_step"], " ".join(f"{t} {result['losses'][t]:.4f}" for t in tasks))
    broken = [n for n, p in raw_model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:  # a finite loss with an overflowing gradient: the optimiser step wrote inf / nan into the weights
        raise RunError(_diverged(cfg, epoch, batches - 1, state["global_step"],
                                 f"the trainable parameters {broken[:3]}{' ...' if len(broken) > 3 else ''} are "
                                 f"not finite"))
    stats = {f"train_loss_{t}": sums[t] / max(batches, 1) for t in tasks}
    stats.update(weighting.epoch_log(tasks))
    columns, rows = raw_model.epoch_stats()
    stats.update(columns)
    state["routing"] += [{"epoch": epoch + 1, **r} for r in rows]
    return stats


def _losses(bad: dict) -> str:
    return " and ".join(f"task {t!r} ({v})" for t, v in bad.items())


def _diverged(cfg: TrainConfig, epoch: int, step: int, global_step: int, what: str) -> str:
    """The message of a run stopped because its numbers stopped being finite (no result row is written)."""
    kept = "its last finished epoch (last.pt)" if epoch > 0 else "only its config (no epoch had finished)"
    return (f"{run_dir(cfg)}: training diverged at epoch {epoch + 1}, step {step + 1} (step {global_step} of the run): "
            f"{what} (inf or nan). The run was stopped and no result was written; the run folder keeps {kept}. "
            f"Usual causes: a learning rate too large for this model (lr={cfg.lr}; try 10x smaller), or a batch whose "
            f"masks are all ignore_index. A changed config is a new run (another run folder); rerunning this one "
            f"would diverge again")


def _all_reduce_grads(optimizer) -> None:
    """Average the gradients over the ranks (one flat all-reduce). A gradient weighting has combined the global
    batch's task gradients already (the same shared gradient on every rank, see endoarss_lib.training.distributed); this
    averages the task-specific parameters' gradients (and a regulariser's) to the global batch's."""
    average_gradients([p for group in optimizer.param_groups for p in group["params"]])


def _write_log(path: Path, rows: list[dict]) -> None:
    if rows:
        write_text_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def build_run_model(cfg: TrainConfig):
    """The run's model, built under the run seed (a random-init frozen backbone is then the same every time)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return build_model_from_config(cfg.model)


def _build_state(cfg: TrainConfig, datasets: dict, device: torch.device) -> dict:
    seed_everything(cfg.seed)
    raw_model = build_run_model(cfg).to(device)
    optimizer, scheduler = _optimizer(raw_model, cfg)
    weighting = get_weighting(cfg.weighting, **cfg.weighting_hparams)
    # torchrun: global-batch BatchNorm, the weighting's global-batch hand-off, DDP for loss-level weightings
    model = prepare_data_parallel(raw_model, weighting, device)
    model = torch.compile(model) if cfg.compile else model
    # CGL: class counts of the TRAINING split only; its own generator, seeded from the run seed (saved in last.pt).
    cls_loss = make_cls_loss(cfg.cls_loss, datasets["train"].class_counts() if cfg.cls_loss != "ce" else None,
                             seed=cfg.seed * 1_000_003 + 7, **cfg.cls_loss_hparams)
    return {"raw_model": raw_model, "model": model, "optimizer": optimizer, "scheduler": scheduler,
            "weighting": weighting, "cls_loss": cls_loss, "device": device, "epoch": 0, "global_step": 0,
            "spec": getattr(datasets.get("train"), "spec", None),  # derives targets the batches do not hold
            "best_score": -float("inf"), "best_epoch": -1, "history": [], "diagnostics": [], "routing": [],
            "wall_time_s": 0.0}


def _provenance(state: dict, fingerprints: dict) -> dict:
    return {"config_hash": state["config_hash"], "weights_sha256": weights_digest(state["raw_model"]),
            "data_fingerprint": fingerprints}


def _checkpoint(state: dict, fingerprints: dict) -> dict:
    return {"version": CHECKPOINT_VERSION, **_provenance(state, fingerprints),
            "model": _trainable_state(state["raw_model"]), "optimizer": state["optimizer"].state_dict(),
            "scheduler": state["scheduler"].state_dict() if state["scheduler"] else None,
            "weighting": state["weighting"].state_dict(), "rng": _rng_state(),
            "cls_loss": state["cls_loss"].state_dict() if state.get("cls_loss") is not None else None,
            **{k: state[k] for k in ("epoch", "global_step", "best_score", "best_epoch", "history", "diagnostics",
                                     "routing", "wall_time_s")}}


def _check_data(path: Path, recorded: dict | None, fingerprints: dict) -> None:
    if recorded is None:
        return
    changed = sorted(s for s in fingerprints if s in recorded and recorded[s] != fingerprints[s])
    if changed:
        raise RunError(f"{path}: the {', '.join(changed)} data changed since this run used it (files added, removed "
                       f"or modified under the data root). Its results belong to the old data: restore the data, or "
                       f"run this config under another run_name / out_dir (the existing run folder is kept)")


def _resume(state: dict, path: Path, cfg: TrainConfig, fingerprints: dict) -> None:
    ckpt = load_checkpoint(path, state["raw_model"], state["config_hash"], weights_digest(state["raw_model"]))
    _check_data(path, ckpt.get("data_fingerprint"), {k: v for k, v in fingerprints.items() if k != "test"})
    state["optimizer"].load_state_dict(ckpt["optimizer"])
    if state["scheduler"] is not None:
        state["scheduler"].load_state_dict(ckpt["scheduler"])
    state["weighting"].load_state_dict(ckpt["weighting"])
    if state.get("cls_loss") is not None:
        state["cls_loss"].load_state_dict(ckpt["cls_loss"])
    _set_rng_state(ckpt["rng"])
    for key in ("epoch", "global_step", "best_score", "best_epoch", "history", "diagnostics", "wall_time_s"):
        state[key] = ckpt[key]
    state["routing"] = ckpt.get("routing", [])


def run_dir(cfg: TrainConfig) -> Path:
    """The folder of a run: ``<out_dir>/<run_name or dataset-backbone-arch-weighting-seed-hash>``."""
    name = cfg.run_name or (f"{cfg.dataset}-{cfg.model.backbone}-{cfg.model.arch}-{cfg.weighting}-s{cfg.seed}-"
                            f"{cfg.results_hash()}")
    return Path(cfg.out_dir).expanduser() / name


def read_run_config(folder: str | Path) -> TrainConfig:
    """The TrainConfig of a run folder (from its ``config.json``); RunError naming the file otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise RunError(f"{path}: no config.json: {folder} is not a run folder written by fit()")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None
    recorded_hash = data.pop("config_hash", None)
    try:
        cfg = TrainConfig(**json.loads(json.dumps(data)))
    except (ConfigError, TypeError) as exc:
        raise RunError(f"{path}: not a config this version can read ({exc})") from None
    cfg.keep_recorded_hash(data, recorded_hash)  # a folder written under an older spelling (weighting=DB-MTL)
    return cfg


def _check_folder(folder: Path, cfg: TrainConfig) -> None:
    """Before anything is written: a folder that holds another config's run is refused, and left untouched."""
    digest = cfg.results_hash()
    for name in ("result.json", "config.json"):
        path = folder / name
        if path.is_file():
            try:
                found = json.loads(path.read_text()).get("config_hash")
            except (json.JSONDecodeError, AttributeError):
                raise RunError(f"{path}: damaged (not JSON); this run folder is left as it is: move it away or choose "
                               f"another run_name / out_dir") from None
            if found != digest:
                raise CheckpointMismatch(
                    f"{folder}: holds the run of another config (hash {found}, this config {digest}); nothing was "
                    f"changed there. Give this config another run_name or out_dir; the existing run is kept")


RUN_LOCK = ".run.lock"  # held by the one process that trains in a run folder


@contextmanager
def _claimed(folder: Path, cfg: TrainConfig):
    """Hold the run folder's lock (an exclusive create of ``.run.lock``, before anything else is read or written):
    one training per folder. A live holder training another config is a LockHeld error (nothing of either run is
    touched); one training the same config is waited for (its result is then returned); a killed holder's lock is
    taken over. A run folder this call created and left empty is removed again."""
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            what = "run folder" if parent == folder else "out_dir" if parent == folder.parent else "parent folder"
            raise RunError(f"{parent}: is a file, but the {what} of this run must be a folder (out_dir="
                           f"{cfg.out_dir!r}, run_name={cfg.run_name!r}); choose another out_dir or run_name")
        if parent.exists():
            break
    existed = folder.exists()
    digest = cfg.results_hash()
    lock = folder_lock(folder, RUN_LOCK, "training", info={"config_hash": digest},
                       wait_for=lambda owner: owner.get("config_hash") == digest)
    try:
        lock.__enter__()
    except LockHeld as exc:
        raise LockHeld(f"{exc}. This run was refused before anything was written; to train this config at the same "
                       f"time, give it another run_name or out_dir") from None
    except OSError as exc:
        raise RunError(f"{folder}: cannot create the run folder: {why_not_written(folder, exc)}; choose another "
                       f"out_dir") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
        if not existed:
            try:
                folder.rmdir()  # only if still empty: a refused run leaves no folder behind
            except OSError:
                pass


def fit(cfg: TrainConfig) -> dict:
    """Train (or resume), select an epoch, evaluate the selected model on test once; return the result row (the
    schema of :class:`~endoarss_lib.training.rows.ResultRow`; a finished run's row as
    :func:`~endoarss_lib.training.rows.read_row` reads it, reporting where the folder is now).

    The run folder is claimed first (:func:`_claimed`): of several trainings started at once into one folder,
    exactly one trains; the others are refused (another config) or wait for it (the same config). A loss or weight
    that stops being finite stops the run with a RunError naming the epoch and step; no result row is written. With
    ``cfg.deterministic`` the run uses deterministic algorithms only (:func:`deterministic_algorithms`). A frozen
    DINOv2 backbone without weights does not start (:func:`~endoarss_lib.config.require_backbone_weights`: the
    command line, notebooks and sweeps alike)."""
    require_backbone_weights(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        describe_device(cfg.device)  # device=cuda without CUDA: refused before anything is written
    folder = run_dir(cfg)
    with deterministic_algorithms(cfg.deterministic):
        if int(os.environ.get("RANK", "0")) != 0 or (folder / "result.json").is_file():
            return _fit(cfg)  # torchrun's other ranks follow rank 0; a finished run is read, never written
        with _claimed(folder, cfg):
            return _fit(cfg)


def _fit(cfg: TrainConfig) -> dict:
    """Train (or resume), select an epoch, evaluate the selected model on test once; return the result row."""
    rank, world = _distributed()
    if cfg.tensorboard:
        require_tensorboard()  # a missing package is a config error before anything runs
    folder = run_dir(cfg)
    result_path = folder / "result.json"
    _check_folder(folder, cfg)
    remove_stale_temporaries(folder)  # what a killed write left (a live writer's younger file is kept)
    datasets = make_datasets(cfg)
    fingerprints = {s: d.fingerprint() for s, d in datasets.items()}
    if result_path.is_file():
        row = json.loads(result_path.read_text())
        _check_data(result_path, row.get("data_fingerprint"), fingerprints)
        weights = cfg.model.pretrained
        if row.get("weights_sha256") is not None and isinstance(weights, str):
            now = (get_pretrained(weights).sha256 if is_pretrained_name(weights)
                   else file_sha256(weights) if Path(weights).is_file() else None)
            if now is not None and now != row["weights_sha256"]:
                raise CheckpointMismatch(f"{result_path}: this run used weights with sha256 {row['weights_sha256']},"
                                         f" but {weights} now has {now}; restore them or run under another run_name")
        if rank == 0:
            log.info("%s: a finished run (result.json); nothing to train, its result is returned", folder)
        return read_row({**row, "run_dir": str(folder)})  # where the folder is now (it may have been moved since)
    if world == 1:
        device, device_text = describe_device(cfg.device)
        _warn_if_no_gpu(cfg.device)
    else:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        device_text = f"{device} per process (torchrun, {world} processes)"
    state = _build_state(cfg, datasets, device)
    state["config_hash"] = cfg.results_hash()
    if (folder / "last.pt").is_file():
        _resume(state, folder / "last.pt", cfg, fingerprints)
    if rank == 0:
        _log_start(cfg, state, folder, device_text, datasets, world)
    if rank == 0:
        write_json_atomic(folder / "config.json", {**cfg.to_dict(), "config_hash": state["config_hash"]})
    if rank == 0 and cfg.tensorboard:
        state["tensorboard"] = TensorBoardLog(folder, cfg.tasks)
    eval_kw = dict(device=device, tasks=cfg.tasks, spec=datasets["train"].spec, amp=cfg.amp,
                   ignore_index=cfg.ignore_index)
    select_split = "test" if cfg.select_on == "test" else "val"
    if cfg.select_on == "test":
        warnings.warn("select_on='test': the epoch is chosen on the TEST split (the released protocol). The reported "
                      "test numbers are then optimistic; use it only to measure that effect", stacklevel=2)
    select_loader = _loader(datasets[select_split], cfg, shuffle=False)
    epoch_times: list[float] = []  # this process's epochs, for the ETA
    while state["epoch"] < cfg.epochs and not _patience_spent(state, cfg):
        if cfg.stop_after_epochs is not None and state["epoch"] >= cfg.stop_after_epochs:
            if state.get("tensorboard") is not None:
                state["tensorboard"].close()
            if rank == 0:
                log.info("stopped after epoch %d/%d (stop_after_epochs=%d); the same command resumes from there",
                         state["epoch"], cfg.epochs, cfg.stop_after_epochs)
            return {"status": "stopped", "epoch": state["epoch"], "run_dir": str(folder)}
        start = time.perf_counter()
        epoch = state["epoch"]
        train_stats = _train_epoch(state, _loader(datasets["train"], cfg, True, epoch, world, rank), epoch, cfg,
                                   rank, world)
        if state["scheduler"] is not None:
            state["scheduler"].step()
        val = evaluate(state["model"], select_loader, distances=cfg.eval_distances_on_val, **eval_kw)
        score = selection_score(val, cfg.select_metric)
        state["wall_time_s"] += time.perf_counter() - start
        state["history"].append({"epoch": epoch + 1, **train_stats,
                                 **{f"{select_split}_{k}": v for k, v in val.items()}, "select_score": score,
                                 "lr": state["optimizer"].param_groups[0]["lr"], "wall_time_s": state["wall_time_s"]})
        state["epoch"] = epoch + 1
        if state.get("tensorboard") is not None:
            state["tensorboard"].epoch(state["history"][-1], select_split)
        if rank == 0:
            improved = score > state["best_score"] or state["best_epoch"] < 0
            if improved:  # the first epoch is kept even at -inf
                state["best_score"], state["best_epoch"] = score, epoch + 1
                _save(folder / "best.pt", {"version": CHECKPOINT_VERSION, **_provenance(state, fingerprints),
                                           "epoch": epoch + 1, "model": _trainable_state(state["raw_model"])})
                log.debug("epoch %d: best so far (%s %.4f), best.pt written", epoch + 1, cfg.select_metric, score)
            _save(folder / "last.pt", _checkpoint(state, fingerprints))
            _write_log(folder / "log.csv", state["history"])
            _write_log(folder / "diagnostics.csv", state["diagnostics"])
            _write_log(folder / "routing.csv", state["routing"])
            epoch_times.append(time.perf_counter() - start)
            remaining = cfg.epochs - state["epoch"]
            log.info(epoch_line(
                epoch=epoch + 1, epochs=cfg.epochs, losses={t: train_stats[f"train_loss_{t}"] for t in cfg.tasks},
                split=select_split, metrics=_shown_metrics(val, cfg), select=cfg.select_metric, score=score,
                best=improved, seconds=epoch_times[-1],
                eta=float(np.mean(epoch_times)) * remaining if remaining else None))
        if world > 1:
            dist.barrier()  # the other ranks read best.pt / last.pt only once rank 0 has written them
    if rank == 0 and state["epoch"] < cfg.epochs and _patience_spent(state, cfg):
        log.info("early stop after epoch %d/%d: %s has not improved on epoch %d for %d epochs (patience=%d)",
                 state["epoch"], cfg.epochs, cfg.select_metric, state["best_epoch"], cfg.patience, cfg.patience)
    load_checkpoint(folder / "best.pt", state["raw_model"], state["config_hash"], weights_digest(state["raw_model"]))
    test = evaluate(state["model"], _loader(datasets["test"], cfg, shuffle=False), distances=True,
                    compat_size=COMPAT_SIZE, per_image_arrays=True, **eval_kw)
    row = _result_row(cfg, state, datasets, test, device, folder, fingerprints)
    if state.get("tensorboard") is not None:
        state["tensorboard"].test(test, state["best_epoch"])
        state["tensorboard"].close()
    if rank == 0:
        write_per_image(folder / PER_IMAGE_FILE, test.arrays)  # before result.json: a finished run has both
        write_json_atomic(result_path, row)
        _finish_run_folder(folder, cfg.keep_last)
        shown = " ".join(f"{k} {test[k]:.4f}" for k in headline_keys(cfg.tasks) if k in test)
        log.info("done: %d epoch%s trained in %s, selected epoch %d; test %s | result %s", state["epoch"],
                 "" if state["epoch"] == 1 else "s", duration(state["wall_time_s"]), state["best_epoch"], shown,
                 result_path)
    return row


def _shown_metrics(val: dict, cfg: TrainConfig) -> dict:
    """The validation metrics an epoch line shows: the tasks' headline metrics and the selection metric."""
    keys = headline_keys(cfg.tasks) + ([cfg.select_metric] if cfg.select_metric != "score" else [])
    return {k: val[k] for k in dict.fromkeys(keys) if k in val}


def _precision(device: torch.device, amp: str) -> str:
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")  # as autocast() decides
    return f"{'bf16 autocast' if on else 'fp32'} (amp={amp})"


def _log_start(cfg: TrainConfig, state: dict, folder: Path, device_text: str, datasets: dict, world: int) -> None:
    """The run's start line (INFO) and what ``--verbose`` adds (DEBUG): the config and the loader settings."""
    model = state["raw_model"]
    params = list(model.parameters())
    log.info(start_line(
        resumed_epoch=state["epoch"], folder=folder, device=device_text, dataset=cfg.dataset,
        sizes={s: len(d) for s, d in datasets.items()}, backbone=cfg.model.backbone, arch=cfg.model.arch,
        tasks=cfg.tasks, trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params), weights=getattr(model, "weights", None) or {},
        precision=_precision(state["device"], cfg.amp), epochs=cfg.epochs, batch_size=cfg.batch_size, world=world,
        grad_accum=cfg.grad_accum))
    log.debug("config %s: %s", state["config_hash"], json.dumps(cfg.to_dict(), default=str))
    log.debug("loader: %s", cfg.runtime_settings(_on_cuda(cfg)))


def _patience_spent(state: dict, cfg: TrainConfig) -> bool:
    """Early stopping: the selection score has not improved for ``cfg.patience`` epochs (a function of the saved
    state only, so a resumed run stops where an uninterrupted one does)."""
    return bool(cfg.patience) and state["best_epoch"] > 0 and state["epoch"] - state["best_epoch"] >= cfg.patience


PER_IMAGE_FILE = "test_per_image.npz"


def write_per_image(path: Path, arrays: dict) -> None:
    """The test split's per-image outcomes (:attr:`Evaluation.arrays`) as a compressed ``.npz``, written atomically:
    what paired bootstrap intervals over test images and per-image analyses need, without the model."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def read_per_image(folder: str | Path, name: str = PER_IMAGE_FILE) -> dict[str, np.ndarray]:
    """The arrays :func:`write_per_image` wrote for a run folder (RunError naming the file when absent)."""
    path = Path(folder) / name
    if not path.is_file():
        raise RunError(f"{path}: no per-image test outcomes (runs finished before they were recorded have none); "
                       "rerun the config under another out_dir to get them")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _finish_run_folder(folder: Path, keep_last: bool) -> None:
    """A finished run keeps ``result.json``, ``best.pt`` (the selected model), ``config.json`` and its logs.
    ``last.pt`` only serves resuming (last epoch's trainable weights + optimiser state: about 3x ``best.pt``) and a
    finished run is never resumed (``fit`` returns its ``result.json``), so it is deleted unless ``keep_last``."""
    if not keep_last:
        (folder / "last.pt").unlink(missing_ok=True)


COMPAT_SIZE = 244  # the released evaluation's label-map side (compat_ metrics are computed at it)


def _result_row(cfg, state, datasets, test: dict, device, folder: Path, fingerprints: dict) -> dict:
    model = state["raw_model"]
    report = model.parameter_report()
    weights = model.weights
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    m = cfg.model
    return ResultRow.with_provenance(
        device, source="train", dataset=cfg.dataset, data="synthetic" if datasets["test"].synthetic else "real",
        backbone=m.backbone, arch=m.arch, sma=bool(m.sma), weighting=cfg.weighting, tasks="+".join(cfg.tasks),
        connector=m.connector or "none", cls_loss=cfg.cls_loss, model_label=m.label, paper_backbone=m.paper_backbone,
        pretrained=weights.get("sha256") or weights.get("source", "random init"),
        pretrained_name=weights.get("name") or (None if weights.get("sha256") is None else
                                                Path(str(weights.get("source"))).name),
        weights_sha256=weights.get("sha256"), random_init_backbone=bool(model.pretrained_random_init),
        synthetic_pretrained_backbone=is_synthetic_pretrained(weights), seed=cfg.seed, preset=cfg.preset,
        image_size=cfg.image_size, epochs=cfg.epochs, best_epoch=state["best_epoch"], epochs_trained=state["epoch"],
        patience=cfg.patience, select_on=cfg.select_on,
        compat_eval_size=COMPAT_SIZE,
        metrics={**{f"test_{k}": v for k, v in test.items()}, **{k: v for k, v in best.items() if k.startswith("val_")}},
        params_total=report.get("total", {}).get("total"), params_trainable=report.get("total", {}).get("trainable"),
        wall_time_s=round(state["wall_time_s"], 2), peak_memory_mib=round(_peak_memory_mib(device), 1),
        peak_memory_kind="cuda max allocated" if device.type == "cuda" else "process peak RSS",
        deterministic=cfg.deterministic, config_hash=cfg.results_hash(), data_fingerprint=fingerprints,
        run_dir=str(folder)).to_dict()


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint records about its provenance (config hash, weights sha256, data fingerprint, epoch)."""
    ckpt = read_checkpoint(path)
    return {k: ckpt.get(k) for k in ("version", "config_hash", "weights_sha256", "data_fingerprint", "epoch")}
