"""The pretraining loop: :func:`pretrain` renders the pool, runs the recipe with resumable atomic checkpoints
(``<name>.ckpt.pt`` every ``checkpoint_every`` steps), and writes ``<name>.safetensors`` (the teacher backbone, timm
key names, :func:`backbone_state_dict`) and ``<name>.json`` (the weight record: recipe, data seeds and counts, steps,
wall time, sha256 and the probes of :func:`endoarss_lib.foundation.probes.record_metrics`)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json_atomic
from ..data import synthetic
from ..models.weights import file_sha256
from ..training.engine import native_bf16
from .crops import MultiCrop
from .images import render_pool
from .objective import SelfDistillation
from .probes import record_metrics
from .recipe import PRETRAIN_TAG, PretrainConfig, _config_json
from .schedules import _param_groups, _schedules

__all__ = ["pretrain", "backbone_state_dict"]


def backbone_state_dict(model: SelfDistillation) -> dict[str, torch.Tensor]:
    """The teacher's ViT weights under timm's key names (what ``build_model(pretrained=...)`` loads)."""
    return {k: v.detach().clone().contiguous().float() for k, v in model.teacher["encoder"].vit.state_dict().items()}


# --------------------------------------------------------------------------------------------------- training
def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, progress: bool = True, evaluate: bool = True,
             pool: torch.Tensor | None = None) -> dict:
    """Run the recipe; write ``<out_dir>/<name>.safetensors`` and ``<name>.json``; return the record.

    A checkpoint (``<name>.ckpt.pt``, atomic) is written every ``checkpoint_every`` steps: running the same command
    again resumes it (for a time budget, the remaining time).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_render = time.perf_counter()
    images = render_pool(cfg, progress=progress) if pool is None else pool
    render_s = time.perf_counter() - t_render
    model = SelfDistillation(cfg).to(device)
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and native_bf16(device))
    groups = _param_groups(model.student)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    crops = MultiCrop(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_path = out_dir / f"{cfg.name}.ckpt.pt"
    step, elapsed, history = 0, 0.0, []
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["config"] != _config_json(cfg):
            raise ValueError(f"{ckpt_path}: a checkpoint of another pretraining config; move it away to start anew")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck["history"]
    budget = cfg.minutes * 60.0
    bar = tqdm(total=cfg.steps or int(budget), desc="pretrain", disable=not progress,
               unit="step" if cfg.steps else "s")
    bar.update(step if cfg.steps else int(elapsed))
    seen = 0
    while True:
        t = step / cfg.steps if cfg.steps else elapsed / budget
        if t >= 1.0:
            break
        start = time.perf_counter()
        sch = _schedules(cfg, t)
        for g in opt.param_groups:
            g["lr"] = sch["lr"]
            if g.get("apply_wd"):
                g["weight_decay"] = sch["wd"]
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        views = [v.to(device, non_blocking=True) for v in crops(images[idx], gen)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(views, sch["teacher_temp"], gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.student.parameters(), cfg.clip_grad)
        opt.step()
        model.update_teacher(sch["momentum"])
        step += 1
        dt = time.perf_counter() - start
        elapsed += dt
        seen += cfg.batch_size
        bar.update(1 if cfg.steps else int(elapsed) - bar.n)
        if step % cfg.log_every == 0 or step == 1:
            rec = {"step": step, "elapsed_s": round(elapsed, 1), "images_per_s": round(cfg.batch_size / dt, 1),
                   **{k: round(float(v.detach()), 4) for k, v in out.items()}, **{k: float(f"{v:.4g}") for k, v in sch.items()}}
            history.append(rec)
            bar.set_postfix(loss=rec["loss"], dino=rec["dino"], ibot=rec["ibot"])
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"config": _config_json(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                            "elapsed": elapsed, "history": history}, tmp)
    bar.close()
    weights = out_dir / f"{cfg.name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(backbone_state_dict(model), str(tmp), metadata={"name": cfg.name, "backbone": cfg.backbone})
    record = {
        "name": cfg.name, "file": weights.name, "sha256": file_sha256(weights), "backbone": cfg.backbone,
        "image_size": cfg.global_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "description": ("DINOv2-architecture ViT (timm DINOv2 code path, patch 14, LayerScale) pretrained by this "
                        "project with DINO + iBOT + KoLeo self-distillation on unlabelled SYNTHETIC endoscopic images; "
                        "a stand-in for DINOv2, not DINOv2."),
        "recipe": _config_json(cfg),
        "data": {"generator": "endoarss_lib.data.synthetic", "generator_version": _generator_version(),
                 "presets": list(cfg.presets), "images": int(len(images)), "render_size": cfg.render_size,
                 "seed_key": f"SeedSequence([{PRETRAIN_TAG:#x}, data_seed={cfg.data_seed}, preset id, index])",
                 "labels_used": False, "views_seen": step * cfg.batch_size},
        "training": {"steps": step, "wall_time_s": round(elapsed, 1), "render_time_s": round(render_s, 1),
                     "amp": "bf16" if use_bf16 else "off",
                     "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version(), "final": history[-1] if history else {}},
        "history": history,
    }
    if evaluate:
        record["metrics"] = record_metrics(weights, cfg.backbone, cfg.layerscale_init, progress=progress)
    write_json_atomic(out_dir / f"{cfg.name}.json", record)
    ckpt_path.unlink(missing_ok=True)
    return record


def _generator_version() -> str:
    return synthetic.GENERATOR_VERSION
