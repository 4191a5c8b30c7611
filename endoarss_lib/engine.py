"""Training engine: ``fit(config)`` trains, selects on validation, tests once, and writes a result row.

A run lives in ``<out_dir>/<run_name>/``: ``config.json``, ``last.pt`` (everything needed to resume, written
atomically after every epoch), ``best.pt`` (the selected model), ``log.csv`` (per epoch), ``diagnostics.csv``
(task-gradient conflict, when enabled), ``routing.csv`` (per epoch and task, the mean routing weight per expert and
the routing entropy of a CMoE connector, when the model has one) and ``result.json`` (the result row).

Seed components (``seed_components.md``): ``cls_loss="cgl"`` trains the activity with MEJO's CGL (class counts of
the training split; its Bernoulli generator is seeded from the run seed and saved in ``last.pt``); a weighting with
``needs_progress`` (GM-Coord) gets each batch's per-task progress scores before its backward and adds its per-epoch
summary (``gm_*`` columns) to ``log.csv``; a CMoE connector adds ``routing_*`` columns to ``log.csv``.

Calling ``fit`` again with the same config resumes an interrupted run, or returns the finished run's row.
"""
from __future__ import annotations

import os
import random
import resource
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from . import __version__
from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .provenance import git_commit
from .config import TrainConfig, data_home
from .data import MTLDataset, get_spec, make_synthetic
from .diagnostics import conflict_record, task_gradient_matrix
from .losses import make_cls_loss, progress_scores, task_losses
from .metrics import ClassificationMeter, SegmentationMeter
from .models import build_model, routing_divergence
from .weighting import get_weighting

__all__ = ["fit", "evaluate", "predict", "load_run_model", "seed_everything", "resolve_device", "load_checkpoint",
           "CheckpointMismatch", "RESULT_METRICS"]

CHECKPOINT_VERSION = 1
RESULT_METRICS = {"cls": ("accuracy", "macro_f1", "weighted_f1", "compat_ac", "compat_f1"),
                  "seg": ("miou", "miou_fg", "dice", "dice_fg", "pixel_acc", "hd", "hd95", "hd_one_sided_rate",
                          "ssim", "compat_miou", "compat_dice", "compat_hd", "compat_ssim")}


class CheckpointMismatch(RuntimeError):
    """A checkpoint does not belong to the config it is loaded for."""


# ------------------------------------------------------------------------------------------------ set-up

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Each DataLoader worker derives NumPy / Python seeds from the torch seed the loader gave it.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as given (a clear error if CUDA is missing)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _data_root(cfg: TrainConfig) -> Path:
    if cfg.data_root is not None:
        return Path(cfg.data_root)
    if not cfg.synthetic:
        raise ValueError("config data_root is required when synthetic=False")
    return data_home() / (f"synthetic_{cfg.dataset}_s{cfg.synthetic_seed}_{cfg.synthetic_n_train}-"
                          f"{cfg.synthetic_n_test}_{cfg.image_size}px")


def make_datasets(cfg: TrainConfig) -> dict[str, MTLDataset]:
    """train / val / test datasets of a config (generating the synthetic set first if asked)."""
    root = _data_root(cfg)
    if cfg.synthetic:
        make_synthetic(root, cfg.dataset, seed=cfg.synthetic_seed, n_train=cfg.synthetic_n_train,
                       n_test=cfg.synthetic_n_test, image_size=cfg.image_size)
    common = dict(dataset=cfg.dataset, image_size=cfg.image_size, val_fraction=cfg.val_fraction,
                  split_seed=cfg.split_seed, id_map=cfg.id_map, ignore_index=cfg.ignore_index)
    return {"train": MTLDataset(root, "train", augment=cfg.augment, **common),
            "val": MTLDataset(root, "val", **common),
            "test": MTLDataset(root, "test", **common)}


def _loader(dataset, cfg: TrainConfig, shuffle: bool, epoch: int = 0, world: int = 1, rank: int = 0):
    # A fresh generator per epoch, seeded from (seed, epoch): the order and the workers' seeds of epoch e do not
    # depend on what ran before, so a resumed run sees exactly the batches an uninterrupted one would.
    generator = torch.Generator().manual_seed(cfg.seed * 10_007 + epoch)
    sampler = None
    if world > 1 and shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=cfg.num_workers, generator=generator, worker_init_fn=_seed_worker,
                      drop_last=False, pin_memory=False)


def _model_options(cfg: TrainConfig, spec) -> dict:
    options = dict(cfg.model)
    options.setdefault("tasks", ("cls", "seg"))
    options["image_size"] = cfg.image_size
    if "cls" in options["tasks"]:
        options["num_activities"] = spec.num_activities
    if "seg" in options["tasks"]:
        options["num_seg_classes"] = spec.num_seg_classes
    return options


def _optimizer(model, cfg: TrainConfig, steps_per_epoch: int):
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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, model: torch.nn.Module, config_hash: str | None = None) -> dict:
    """Load a checkpoint (``weights_only=True``) into ``model``; raise CheckpointMismatch if it does not fit."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if config_hash is not None and ckpt.get("config_hash") != config_hash:
        raise CheckpointMismatch(f"{path}: written for config {ckpt.get('config_hash')}, not {config_hash}; use "
                                 f"another run_name or out_dir, or delete the run folder to start again")
    expected = set(_trainable_state(model))
    missing, unexpected = sorted(expected - set(ckpt["model"])), sorted(set(ckpt["model"]) - expected)
    if missing or unexpected:
        raise CheckpointMismatch(f"{path}: does not match the model: missing {missing[:8]}, unexpected "
                                 f"{unexpected[:8]}")
    model.load_state_dict(ckpt["model"], strict=False)
    return ckpt


# ------------------------------------------------------------------------------------------------ evaluation

def _autocast(device: torch.device, amp: str):
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model, loader, device, tasks, num_activities: int | None = None, num_seg_classes: int | None = None,
             distances: bool = True, amp: str = "auto", ignore_index: int = 255, progress: bool = False) -> dict:
    """Metrics of ``model`` over a whole loader, with every task's keys prefixed ``cls_`` / ``seg_``."""
    from tqdm.auto import tqdm

    model.eval()
    cls_meter = ClassificationMeter(num_activities) if "cls" in tasks else None
    seg_meter = SegmentationMeter(num_seg_classes, ignore_index=ignore_index, compute_distances=distances,
                                  compute_ssim=distances) if "seg" in tasks else None
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with _autocast(device, amp):
            out = model(batch["image"].to(device))
        if cls_meter:
            cls_meter.update(out["cls"].float().argmax(1).cpu(), batch["label"])
        if seg_meter:
            seg_meter.update(out["seg"].float().argmax(1).cpu(), batch["mask"])
    metrics = {}
    for task, meter in (("cls", cls_meter), ("seg", seg_meter)):
        if meter is not None:
            values = meter.compute()
            metrics.update({f"{task}_{k}": float(values[k]) for k in RESULT_METRICS[task] if k in values})
    return metrics


def selection_score(metrics: dict, key: str) -> float:
    """The validation number model selection maximises: 'score' = mean of accuracy and mIoU present."""
    if key != "score":
        return float(metrics[key])
    parts = [metrics[k] for k in ("cls_accuracy", "seg_miou") if k in metrics]
    return float(np.mean(parts))


# ------------------------------------------------------------------------------------------------ training

def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide peak RSS


def _train_epoch(state: dict, loader, epoch: int, cfg: TrainConfig, rank: int, world: int) -> dict:
    from tqdm.auto import tqdm

    model, optimizer, weighting = state["model"], state["optimizer"], state["weighting"]
    device, tasks = state["device"], cfg.tasks
    connector = getattr(state["raw_model"], "connector", None)
    routing: dict[str, list] = {}  # task -> [sum of batch-mean weights x images, sum of entropies x images, images]
    shared = [p for p in state["raw_model"].trainable_shared_parameters()]
    heads = [state["raw_model"].task_specific_parameters(t) for t in tasks]
    model.train()
    weighting.set_epoch(epoch, cfg.epochs)
    sums, batches = {t: 0.0 for t in tasks}, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not cfg.progress or rank > 0)
    for step, batch in enumerate(bar):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with _autocast(device, cfg.amp):
            out = model(batch["image"])
        if connector is not None and getattr(connector, "last_routing", None):
            n = batch["image"].shape[0]
            for t, r in connector.last_routing.items():
                acc = routing.setdefault(t, [torch.zeros(r["weights"].numel(), dtype=torch.float64), 0.0, 0])
                acc[0] += r["weights"].detach().cpu().double() * n
                acc[1] += float(r["entropy"]) * n
                acc[2] += n
        raw = task_losses(out, batch, tasks, cfg.ignore_index, cfg.label_smoothing, cls_loss=state.get("cls_loss"))
        losses = torch.stack([raw[t] * cfg.loss_weights.get(t, 1.0) / cfg.grad_accum for t in tasks])
        state["global_step"] += 1
        if cfg.diagnostics_every and state["global_step"] % cfg.diagnostics_every == 0 and len(tasks) > 1:
            grads, slices = task_gradient_matrix(losses, state["raw_model"].named_trainable_shared_parameters())
            state["diagnostics"].append({"epoch": epoch, "step": state["global_step"],
                                         **conflict_record(grads, slices)})
        if getattr(weighting, "needs_progress", False):
            weighting.set_progress(progress_scores(out, batch, tasks, cfg.ignore_index))
        regulariser = state["raw_model"].regularization_loss()
        if regulariser.requires_grad:
            regulariser.backward(retain_graph=True)  # DSelect-k's entropy term reaches its selectors
        weighting.backward(losses, shared, heads)
        if (step + 1) % cfg.grad_accum == 0 or step + 1 == len(loader):
            if world > 1:
                _all_reduce_grads(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for t in tasks:
            sums[t] += raw[t].item()
        batches += 1
        bar.set_postfix({t: f"{sums[t] / batches:.3f}" for t in tasks})
    stats = {f"train_loss_{t}": sums[t] / max(batches, 1) for t in tasks}
    if hasattr(weighting, "epoch_log"):
        stats.update(weighting.epoch_log(tasks))
    if routing:
        means = {t: acc[0] / acc[2] for t, acc in routing.items()}
        for t, acc in routing.items():
            state["routing"].append({"epoch": epoch + 1, "task": t, "entropy": acc[1] / acc[2],
                                     **{f"expert{e}": float(w) for e, w in enumerate(means[t])}})
            stats[f"routing_entropy_{t}"] = acc[1] / acc[2]
        if len(means) >= 2:
            stats["routing_js"] = routing_divergence(means[tasks[0]], means[tasks[1]])
    return stats


def _all_reduce_grads(optimizer) -> None:
    # Gradient methods combine each rank's task gradients locally; the combined gradients are then averaged.
    world = dist.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def _write_log(path: Path, rows: list[dict]) -> None:
    if rows:
        write_text_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def _build_state(cfg: TrainConfig, datasets: dict, device: torch.device) -> dict:
    spec = datasets["train"].spec
    seed_everything(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        raw_model = build_model(**_model_options(cfg, spec)).to(device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    optimizer, scheduler = _optimizer(raw_model, cfg, len(datasets["train"]))
    weighting = get_weighting(cfg.weighting, **cfg.weighting_hparams)
    # CGL: class counts of the TRAINING split only; its own generator, seeded from the run seed (saved in last.pt).
    cls_loss = make_cls_loss(cfg.cls_loss, datasets["train"].class_counts() if cfg.cls_loss != "ce" else None,
                             seed=cfg.seed * 1_000_003 + 7, **cfg.cls_loss_hparams)
    return {"raw_model": raw_model, "model": model, "optimizer": optimizer, "scheduler": scheduler,
            "weighting": weighting, "cls_loss": cls_loss, "device": device, "epoch": 0, "global_step": 0,
            "best_score": -float("inf"), "best_epoch": -1, "history": [], "diagnostics": [], "routing": [],
            "wall_time_s": 0.0}


def _checkpoint(state: dict, cfg: TrainConfig) -> dict:
    return {"version": CHECKPOINT_VERSION, "config_hash": cfg.results_hash(), "model": _trainable_state(
        state["raw_model"]), "optimizer": state["optimizer"].state_dict(),
        "scheduler": state["scheduler"].state_dict() if state["scheduler"] else None,
        "weighting": state["weighting"].state_dict(), "rng": _rng_state(),
        "cls_loss": state["cls_loss"].state_dict() if state.get("cls_loss") is not None else None,
        **{k: state[k] for k in ("epoch", "global_step", "best_score", "best_epoch", "history", "diagnostics",
                                 "routing", "wall_time_s")}}


def _resume(state: dict, path: Path, cfg: TrainConfig) -> None:
    ckpt = load_checkpoint(path, state["raw_model"], cfg.results_hash())
    state["optimizer"].load_state_dict(ckpt["optimizer"])
    if state["scheduler"] is not None:
        state["scheduler"].load_state_dict(ckpt["scheduler"])
    state["weighting"].load_state_dict(ckpt["weighting"])
    if state.get("cls_loss") is not None:
        state["cls_loss"].load_state_dict(ckpt["cls_loss"])
    _set_rng_state(ckpt["rng"])
    for key in ("epoch", "global_step", "best_score", "best_epoch", "history", "diagnostics", "wall_time_s"):
        state[key] = ckpt[key]
    state["routing"] = ckpt.get("routing", [])  # checkpoints written before routing logs existed have none


def run_dir(cfg: TrainConfig) -> Path:
    """The folder of a run: ``<out_dir>/<run_name or dataset-arch-weighting-seed-hash>``."""
    name = cfg.run_name or (f"{cfg.dataset}-{cfg.model.get('backbone', 'model')}-{cfg.model.get('arch', 'hps')}-"
                            f"{cfg.weighting}-s{cfg.seed}-{cfg.results_hash()}")
    return Path(cfg.out_dir) / name


def fit(cfg: TrainConfig) -> dict:
    """Train (or resume), select on validation, evaluate the selected model on test once; return the result row."""
    rank, world = _distributed()
    folder = run_dir(cfg)
    result_path = folder / "result.json"
    if result_path.is_file():
        import json
        row = json.loads(result_path.read_text())
        if row.get("config_hash") == cfg.results_hash():
            return row
        raise CheckpointMismatch(f"{result_path}: a finished run of another config lives here")
    device = resolve_device(cfg.device) if world == 1 else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    datasets = make_datasets(cfg)
    state = _build_state(cfg, datasets, device)
    if rank == 0:
        write_json_atomic(folder / "config.json", {**cfg.to_dict(), "config_hash": cfg.results_hash()})
    if (folder / "last.pt").is_file():
        _resume(state, folder / "last.pt", cfg)
    spec = datasets["train"].spec
    eval_kw = dict(device=device, tasks=cfg.tasks, num_activities=spec.num_activities,
                   num_seg_classes=spec.num_seg_classes, amp=cfg.amp, ignore_index=cfg.ignore_index)
    val_loader = _loader(datasets["val"], cfg, shuffle=False)
    while state["epoch"] < cfg.epochs:
        if cfg.stop_after_epochs is not None and state["epoch"] >= cfg.stop_after_epochs:
            return {"status": "stopped", "epoch": state["epoch"], "run_dir": str(folder)}
        start = time.perf_counter()
        epoch = state["epoch"]
        train_stats = _train_epoch(state, _loader(datasets["train"], cfg, True, epoch, world, rank), epoch, cfg,
                                   rank, world)
        if state["scheduler"] is not None:
            state["scheduler"].step()
        val = evaluate(state["model"], val_loader, distances=cfg.eval_distances_on_val, **eval_kw)
        score = selection_score(val, cfg.select_metric)
        state["wall_time_s"] += time.perf_counter() - start
        state["history"].append({"epoch": epoch + 1, **train_stats, **{f"val_{k}": v for k, v in val.items()},
                                 "val_select": score, "lr": state["optimizer"].param_groups[0]["lr"],
                                 "wall_time_s": state["wall_time_s"]})
        state["epoch"] = epoch + 1
        if rank == 0:
            if score > state["best_score"]:
                state["best_score"], state["best_epoch"] = score, epoch + 1
                _save(folder / "best.pt", {"config_hash": cfg.results_hash(), "epoch": epoch + 1,
                                           "model": _trainable_state(state["raw_model"])})
            _save(folder / "last.pt", _checkpoint(state, cfg))
            _write_log(folder / "log.csv", state["history"])
            _write_log(folder / "diagnostics.csv", state["diagnostics"])
            _write_log(folder / "routing.csv", state["routing"])
        if world > 1:
            dist.barrier()  # the other ranks read best.pt / last.pt only once rank 0 has written them
    load_checkpoint(folder / "best.pt", state["raw_model"], cfg.results_hash())
    test_loader = _loader(datasets["test"], cfg, shuffle=False)
    test = evaluate(state["model"], test_loader, distances=True, **eval_kw)
    row = _result_row(cfg, state, datasets, test, device, folder)
    if rank == 0:
        write_json_atomic(result_path, row)
    return row


def _result_row(cfg, state, datasets, test: dict, device, folder: Path) -> dict:
    model = state["raw_model"]
    report = model.parameter_report()
    weights = model.weights
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    return {"dataset": cfg.dataset, "data": "synthetic" if datasets["test"].synthetic else "real",
            "backbone": cfg.model.get("backbone"), "arch": cfg.model.get("arch", "hps"),
            "sma": bool(cfg.model.get("sma", False)), "weighting": cfg.weighting, "tasks": "+".join(cfg.tasks),
            "connector": cfg.model.get("connector") or "none", "cls_loss": cfg.cls_loss,
            "pretrained": weights.get("sha256") or weights.get("source", "random init"),
            "random_init_backbone": bool(model.pretrained_random_init), "seed": cfg.seed, "preset": cfg.preset,
            "image_size": cfg.image_size, "epochs": cfg.epochs, "best_epoch": state["best_epoch"],
            **{f"test_{k}": v for k, v in test.items()},
            **{k: v for k, v in best.items() if k.startswith("val_")},
            "params_total": report.get("total", {}).get("total"),
            "params_trainable": report.get("total", {}).get("trainable"),
            "wall_time_s": round(state["wall_time_s"], 2), "device": str(device),
            "peak_memory_mib": round(_peak_memory_mib(device), 1),
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
            "library_version": __version__, "git_commit": git_commit(), "config_hash": cfg.results_hash(),
            "run_dir": str(folder)}


def load_run_model(folder: str | Path, device: str = "cpu"):
    """The selected (best) model of a run folder, rebuilt from its config.json, in eval mode.

    Checkpoints hold the trainable parameters only; frozen weights come from the pretrained file or, for a
    randomly initialised backbone, from the run seed: the model is built under ``torch.manual_seed(cfg.seed)`` (as
    ``fit`` builds it), inside a forked RNG so the caller's random state is left alone.
    """
    import json

    from .config import TrainConfig

    folder = Path(folder)
    data = json.loads((folder / "config.json").read_text())
    data.pop("config_hash", None)
    cfg = TrainConfig(**data)
    spec = get_spec(cfg.dataset)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("default")
        torch.manual_seed(cfg.seed)
        model = build_model(**_model_options(cfg, spec))
    load_checkpoint(folder / "best.pt", model, cfg.results_hash())
    return model.to(resolve_device(device)).eval()


@torch.no_grad()
def predict(model, dataset, indices=None, device: str = "cpu") -> list[dict]:
    """Per-sample predictions for display: image (uint8), true / predicted mask and activity, class probabilities."""
    from .viz import denormalize

    model.eval()
    device = resolve_device(device)
    out = []
    for index in (range(len(dataset)) if indices is None else indices):
        item = dataset[int(index)]
        result = model(item["image"][None].to(device))
        row = {"index": int(index), "path": item["path"], "image": denormalize(item["image"]),
               "mask": item["mask"].numpy(), "label": int(item["label"])}
        if "seg" in result:
            row["pred_mask"] = result["seg"][0].float().argmax(0).cpu().numpy()
        if "cls" in result:
            probs = result["cls"][0].float().softmax(0).cpu().numpy()
            row["pred_label"], row["cls_probs"] = int(probs.argmax()), probs
        out.append(row)
    return out
