"""The recipe's schedules at a progress t in [0, 1] (learning rate with warm-up and cosine decay, weight decay,
teacher momentum, teacher temperature) and the optimiser's parameter groups (no weight decay on norms, biases,
position embeddings, tokens and LayerScale)."""
from __future__ import annotations

import math

from torch import nn

from .recipe import PretrainConfig


def _cosine(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _schedules(cfg: PretrainConfig, t: float) -> dict:
    """Every schedule at progress t in [0, 1] (steps done / total, or time used / budget)."""
    lr = cfg.lr * t / cfg.warmup if t < cfg.warmup else _cosine(cfg.lr, cfg.min_lr, (t - cfg.warmup) / (1 - cfg.warmup))
    tt = cfg.teacher_temp if t >= cfg.teacher_temp_warmup else (
        cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * t / cfg.teacher_temp_warmup)
    return {"lr": lr, "wd": _cosine(cfg.weight_decay, cfg.weight_decay_end, t),
            "momentum": _cosine(cfg.momentum_teacher, 1.0, t), "teacher_temp": tt}


def _param_groups(model: nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(("pos_embed", "cls_token", "mask_token", "gamma")) else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]
