"""Self-supervised pretraining of the project's small foundation model on unlabelled synthetic endoscopic images.

EndoARSS adapts a *frozen* foundation model (DINOv2) with LoRA, TESLA and SMA. No DINOv2 weights can ship with this
repository, and a randomly initialised ViT gives the adapters nothing to adapt, so the project pretrains a small ViT
of DINOv2's architecture (timm's DINOv2 code path: patch 14, LayerScale) with DINOv2's own recipe, scaled down:

* **DINO** (Caron et al., ICCV 2021): a student matches a momentum teacher's softmax over prototypes of the class
  token across multi-crop views (2 global + L local crops), teacher outputs centred and sharpened;
* **iBOT** (Zhou et al., ICLR 2022): the student sees some patch tokens masked and predicts the teacher's prototype
  distribution of the unmasked patch tokens (the dense, patch-level objective that makes frozen features segment);
* **KoLeo** (Sablayrolles et al., 2019; DINOv2): spreads the student's class tokens within a batch.

Images come from the synthetic generator (:mod:`endoarss_lib.data.synthetic`) with seeds disjoint from every dataset
the notebooks and tests draw (:func:`pretrain_rng`), across the three presets (the domain-shifted one included), and
no label or mask is ever read. ``python -m endoarss_lib.pretrain --help`` lists the recipe's options; the run writes
``<name>.safetensors`` (the teacher backbone, timm key names) and ``<name>.json`` (the weight record: recipe, data
seeds and counts, steps, wall time, sha256 and the evaluation of :func:`evaluate_backbone`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path, write_json_atomic

__all__ = ["PretrainConfig", "pretrain_rng", "render_pool", "MultiCrop", "DINOHead", "SelfDistillation", "sinkhorn_knopp",
           "pretrain", "extract_features", "evaluate_backbone", "main", "PRETRAIN_PRESETS"]

# SeedSequence key of pretraining image i: [PRETRAIN_TAG, seed, preset id, i]. Dataset images use the 5-entry key
# [seed, preset id, split id, activity, k] (``synthetic.sample_rng``): a different key, hence a disjoint stream.
PRETRAIN_TAG = 0x70726574  # "pret"
PRETRAIN_PRESETS = ("mtlesd", "mtlendovis", "mtlendovis_gen")


@dataclass
class PretrainConfig:
    """The pretraining recipe (defaults: the bundled ``synthdino_vit_mini14`` weights; about an hour on 2 CPU cores)."""

    name: str = "synthdino_vit_mini14"  # weight record name (file stem)
    backbone: str = "vit_mini_patch14"  # key of models.BACKBONES (a DINOv2-architecture ViT)
    layerscale_init: float = 0.1  # LayerScale start value (learned; timm's DINOv2 default is 1e-5)
    # data: rendered once into memory, uint8
    presets: tuple = PRETRAIN_PRESETS
    pool_size: int = 12_000  # images rendered (split evenly over the presets; activities drawn uniformly)
    render_size: int = 160  # side of the rendered images (crops are cut from them)
    data_seed: int = 0
    # multi-crop (DINO)
    global_size: int = 112
    local_size: int = 56
    num_local: int = 4
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    colour_jitter: float = 0.4  # brightness / contrast / saturation strength (hue = strength / 4), p = 0.8
    # objectives
    out_dim: int = 512  # prototypes of the DINO head
    patch_out_dim: int = 512  # prototypes of the iBOT head
    head_hidden: int = 512
    head_bottleneck: int = 128
    head_bn: bool = True  # batch norm in the heads' MLPs (see DINOHead)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3  # fraction of the run over which the teacher temperature rises
    centering: str = "sinkhorn"  # teacher targets: "sinkhorn" (Sinkhorn-Knopp, DINOv2) | "ema" (DINO's centre)
    center_momentum: float = 0.9  # "ema" centering only
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5  # share of global crops that get masked patches
    mask_ratio: tuple = (0.1, 0.5)
    # optimisation
    batch_size: int = 64
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup: float = 0.05  # fraction of the run
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.99  # teacher EMA momentum at the start (cosine to 1)
    clip_grad: float = 3.0
    steps: int = 1400  # optimisation steps (0: as many as fit in ``minutes``; a step count reproduces, a time budget
    #                    depends on the machine)
    minutes: float = 50.0  # time budget when steps == 0 (the schedules follow the elapsed time)
    amp: str = "auto"  # bf16 autocast: "auto" (where bf16 is native: CUDA, CPUs with AVX512-BF16 / AMX), "bf16" or
    #                    "off"; master weights stay fp32 (the record's training.amp says what was used)
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads on CPU (0: leave torch's default)
    log_every: int = 20
    checkpoint_every: int = 100  # steps between resumable checkpoints (atomic)

    def __post_init__(self):
        for f in ("presets", "global_scale", "local_scale", "mask_ratio"):
            setattr(self, f, tuple(getattr(self, f)))
        from ..data.synthetic import SYNTHETIC_PRESETS

        bad = [p for p in self.presets if p not in SYNTHETIC_PRESETS]
        if bad or not self.presets:
            raise ValueError(f"presets={self.presets!r}: expected names from {sorted(SYNTHETIC_PRESETS)}")
        for name in ("pool_size", "render_size", "global_size", "local_size", "batch_size", "out_dim",
                     "patch_out_dim", "head_hidden", "head_bottleneck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"pretrain {name}={v!r}: expected a positive int")
        if self.global_size % 14 or self.local_size % 14:
            raise ValueError(f"global_size={self.global_size} and local_size={self.local_size} must be multiples of "
                             "the patch size 14")
        if self.centering not in ("sinkhorn", "ema"):
            raise ValueError(f"pretrain centering={self.centering!r}: expected 'sinkhorn' or 'ema'")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"pretrain amp={self.amp!r}: expected 'auto', 'bf16' or 'off'")
        if self.steps < 0 or (self.steps == 0 and self.minutes <= 0):
            raise ValueError("pretrain: give steps >= 1 or minutes > 0")


# ------------------------------------------------------------------------------------------------------ images
def pretrain_rng(seed: int, preset: str, index: int) -> np.random.Generator:
    """Generator of pretraining image ``index`` of ``preset`` (disjoint from every dataset image's generator)."""
    from ..data.synthetic import _PRESET_IDS

    return np.random.default_rng(np.random.SeedSequence([PRETRAIN_TAG, int(seed), _PRESET_IDS[preset], int(index)]))


def _render_chunk(args) -> np.ndarray:
    from ..data.synthetic import preset_activities, render_sample

    seed, preset, start, stop, size = args
    out = np.empty((stop - start, size, size, 3), np.uint8)
    names = preset_activities(preset)
    for j, i in enumerate(range(start, stop)):
        rng = pretrain_rng(seed, preset, i)
        activity = names[int(rng.integers(len(names)))]
        out[j] = render_sample(preset, activity, rng, image_size=size)[0]  # the mask is never used
    return out


def render_pool(cfg: PretrainConfig, workers: int = 1, progress: bool = True) -> torch.Tensor:
    """The unlabelled pool: (N, 3, S, S) uint8, ``pool_size`` images split evenly over ``cfg.presets``."""
    from tqdm.auto import tqdm

    per = [cfg.pool_size // len(cfg.presets) + (i < cfg.pool_size % len(cfg.presets))
           for i in range(len(cfg.presets))]
    jobs = []
    for preset, n in zip(cfg.presets, per):
        for start in range(0, n, 250):
            jobs.append((cfg.data_seed, preset, start, min(n, start + 250), cfg.render_size))
    bar = tqdm(total=cfg.pool_size, desc="render pretraining images", disable=not progress)
    chunks = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("forkserver").Pool(workers) as pool:
            for arr in pool.imap(_render_chunk, jobs):
                chunks.append(arr)
                bar.update(len(arr))
    else:
        for job in jobs:
            chunks.append(_render_chunk(job))
            bar.update(len(chunks[-1]))
    bar.close()
    return torch.from_numpy(np.concatenate(chunks)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------- augmentation (batched)
_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
_GREY = torch.tensor((0.299, 0.587, 0.114)).view(1, 3, 1, 1)


def _random_boxes(n: int, side: int, scale: tuple, gen: torch.Generator, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes (x0, y0, x1, y1) in pixels, one per image (area share in ``scale``)."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen) * side * side
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=side)
    h = torch.sqrt(area / r).clamp(max=side)
    x0 = torch.rand(n, generator=gen) * (side - w)
    y0 = torch.rand(n, generator=gen) * (side - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma in pixels, 0 = none) as one grouped separable convolution."""
    n, c, h, w = x.shape
    k = 2 * int(math.ceil(3 * float(sigma.max()))) + 1 if float(sigma.max()) > 0 else 1
    if k == 1:
        return x
    t = torch.arange(k, dtype=x.dtype) - k // 2
    kern = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kern = torch.where(sigma[:, None] > 0, kern, (t[None] == 0).to(x.dtype))
    kern = kern / kern.sum(1, keepdim=True)
    kern = kern.repeat_interleave(c, 0)  # (n*c, k)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


class MultiCrop:
    """DINO's multi-crop augmentation on a batch of uint8 images, vectorised (roi_align crops, batched colour ops).

    Global crop 1: blur always; global crop 2: blur p = 0.1, solarise p = 0.2; local crops: blur p = 0.5. All crops:
    horizontal flip p = 0.5, colour jitter p = 0.8 (brightness, contrast, saturation, hue), greyscale p = 0.2.
    Returns ImageNet-normalised float crops: ``[global1, global2, local1, ...]``, each (B, 3, s, s).
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def _crop(self, images: torch.Tensor, size: int, scale: tuple, gen: torch.Generator) -> torch.Tensor:
        from torchvision.ops import roi_align

        n, side = images.shape[0], images.shape[-1]
        boxes = _random_boxes(n, side, scale, gen)
        rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], 1)
        x = roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        flip = torch.rand(n, generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def _colour(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, s = x.shape[0], self.cfg.colour_jitter
        on = (torch.rand(n, generator=gen) < 0.8).float().view(n, 1, 1, 1)

        def factor():
            return 1 + (torch.rand(n, generator=gen) * 2 - 1).view(n, 1, 1, 1) * s * on

        y = x * factor()  # brightness
        mean = (y * _GREY).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        y = (y - mean) * factor() + mean  # contrast
        grey = (y * _GREY).sum(1, keepdim=True)
        y = (y - grey) * factor() + grey  # saturation
        # hue: rotate the chroma plane (YIQ) by up to +-(s/4) of a turn
        theta = (torch.rand(n, generator=gen) * 2 - 1) * (s / 4) * 2 * math.pi * on.view(n)
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rgb = torch.linalg.inv(yiq)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(n, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = rgb[None] @ rot @ yiq[None]  # (n, 3, 3)
        y = torch.einsum("nij,njhw->nihw", m, y)
        grey_on = (torch.rand(n, generator=gen) < 0.2).view(n, 1, 1, 1)
        y = torch.where(grey_on, (y * _GREY).sum(1, keepdim=True).expand_as(y), y)
        return y.clamp(0, 1)

    def _finish(self, x: torch.Tensor, blur_p: float, solarise_p: float, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        x = self._colour(x, gen)
        sigma = torch.empty(n).uniform_(0.1, 2.0, generator=gen) * x.shape[-1] / 224
        sigma = torch.where(torch.rand(n, generator=gen) < blur_p, sigma, torch.zeros(n))
        x = _blur(x, sigma)
        if solarise_p:
            sol = (torch.rand(n, generator=gen) < solarise_p).view(n, 1, 1, 1)
            x = torch.where(sol & (x >= 0.5), 1 - x, x)
        return (x - _MEAN) / _STD

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        c = self.cfg
        x = images.float() / 255.0
        crops = [self._finish(self._crop(x, c.global_size, c.global_scale, gen), 1.0, 0.0, gen),
                 self._finish(self._crop(x, c.global_size, c.global_scale, gen), 0.1, 0.2, gen)]
        crops += [self._finish(self._crop(x, c.local_size, c.local_scale, gen), 0.5, 0.0, gen)
                  for _ in range(c.num_local)]
        return crops


# ------------------------------------------------------------------------------------------------------ model
class DINOHead(nn.Module):
    """MLP (Linear-[BN]-GELU x2 -> bottleneck) -> L2 normalise -> weight-normalised prototypes (norm fixed at 1).

    ``bn=True`` (DINO's ``use_bn_in_head``): batch normalisation in the MLP removes the component every input shares.
    Measured here: without it the class-token head of a short CPU run maps all images to one direction (pairwise
    cosine 0.997), the teacher targets stay uniform and the DINO loss sits at log K for the whole run."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128, bn: bool = True):
        super().__init__()

        def norm():
            return nn.BatchNorm1d(hidden) if bn else nn.Identity()

        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        h = self.mlp(x.reshape(-1, x.shape[-1])).reshape(*shape, -1)  # BatchNorm1d over every token of the batch
        return F.linear(F.normalize(h, dim=-1), F.normalize(self.prototypes, dim=-1))


class _Encoder(nn.Module):
    """A timm ViT (DINOv2 layout) that returns (class token, patch tokens) and can mask patch tokens (iBOT)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vit
        t = v.patch_embed(x)  # (B, h, w, C) with dynamic_img_size, else (B, N, C)
        if mask is not None:
            m = mask.view(t.shape[:-1] + (1,))
            t = torch.where(m, self.mask_token.to(t.dtype).view((1,) * (t.ndim - 1) + (-1,)), t)
        t = v.norm_pre(v._pos_embed(t))
        t = v.norm(v.blocks(t))
        return t[:, 0], t[:, v.num_prefix_tokens:]


class SelfDistillation(nn.Module):
    """Student and momentum teacher (encoder + DINO head + iBOT head) with DINO, iBOT and KoLeo losses."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        from ..models.backbones import create_timm_backbone

        self.cfg = cfg
        vit, _ = create_timm_backbone(cfg.backbone, cfg.global_size, pretrained=False,
                                      layerscale_init=cfg.layerscale_init)
        dim = vit.embed_dim

        def make():
            return nn.ModuleDict({"encoder": _Encoder(vit),
                                  "dino": DINOHead(dim, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck,
                                                   cfg.head_bn),
                                  "ibot": DINOHead(dim, cfg.patch_out_dim, cfg.head_hidden, cfg.head_bottleneck,
                                                   cfg.head_bn)})

        self.student = make()
        import copy

        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, cfg.patch_out_dim))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)

    def masks(self, n: int, grid: int, gen: torch.Generator) -> torch.Tensor:
        """(n, grid*grid) boolean patch masks: ``mask_probability`` of the crops get a ratio in ``mask_ratio``."""
        c = self.cfg
        ratio = torch.empty(n).uniform_(*c.mask_ratio, generator=gen)
        ratio = torch.where(torch.rand(n, generator=gen) < c.mask_probability, ratio, torch.zeros(n))
        scores = torch.rand(n, grid * grid, generator=gen)
        k = (ratio * grid * grid).round().long()
        ranks = scores.argsort(1).argsort(1)
        return ranks < k[:, None]

    def forward(self, crops: list[torch.Tensor], teacher_temp: float, gen: torch.Generator) -> dict:
        c = self.cfg
        n = crops[0].shape[0]
        glob = torch.cat(crops[:2])
        grid = c.global_size // 14
        masks = self.masks(2 * n, grid, gen)
        with torch.no_grad():
            t_cls, t_patch = self.teacher["encoder"](glob)
            t_cls_logits = self.teacher["dino"](t_cls)
            t_patch_logits = self.teacher["ibot"](t_patch)
            if c.centering == "sinkhorn":
                t_cls_p = sinkhorn_knopp(t_cls_logits.float(), teacher_temp)
                t_patch_p = torch.zeros_like(t_patch_logits, dtype=torch.float32)
                if masks.any():
                    t_patch_p[masks] = sinkhorn_knopp(t_patch_logits[masks].float(), teacher_temp)
            else:
                t_cls_p = F.softmax((t_cls_logits - self.center) / teacher_temp, -1)
                t_patch_p = F.softmax((t_patch_logits - self.patch_center) / teacher_temp, -1)
        s_cls, s_patch = self.student["encoder"](glob, masks)
        s_glob_logits = self.student["dino"](s_cls)
        s_local_logits = []
        if len(crops) > 2:
            loc = torch.cat(crops[2:])
            lc, _ = self.student["encoder"](loc)
            s_local_logits = list(self.student["dino"](lc).chunk(len(crops) - 2))
        s_logits = list(s_glob_logits.chunk(2)) + s_local_logits
        t_p = t_cls_p.chunk(2)
        # DINO: every student view against every teacher (global) view of another crop
        terms = []
        for ti, tp in enumerate(t_p):
            for si, sl in enumerate(s_logits):
                if si == ti:
                    continue
                terms.append(-(tp * F.log_softmax(sl / c.student_temp, -1)).sum(-1).mean())
        dino = torch.stack(terms).mean()
        # iBOT: masked student patches predict the teacher's distribution of the same (unmasked) patches
        if masks.any():
            s_pl = self.student["ibot"](s_patch[masks])
            per = -(t_patch_p[masks] * F.log_softmax(s_pl / c.student_temp, -1)).sum(-1)
            weight = (1.0 / masks.sum(1).clamp(min=1).float())[:, None].expand_as(masks)[masks]
            ibot = (per * weight).sum() / masks.any(1).sum().clamp(min=1)
        else:
            ibot = s_patch.sum() * 0.0
        # KoLeo on the student's class tokens of each global view
        koleo = sum(_koleo(z) for z in s_cls.chunk(2)) / 2
        loss = dino + c.ibot_weight * ibot + c.koleo_weight * koleo
        with torch.no_grad():
            m = c.center_momentum
            self.center.mul_(m).add_(t_cls_logits.mean(0, keepdim=True), alpha=1 - m)
            self.patch_center.mul_(m).add_(t_patch_logits.mean((0, 1)).view(1, 1, -1), alpha=1 - m)
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}


def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) by Sinkhorn-Knopp (SwAV; DINOv2's teacher centering): rows sum to 1, prototypes used
    equally over the batch. Unlike DINO's running centre it gives peaked, balanced targets from the first step."""
    q = torch.exp((logits - logits.max()) / temp).t()  # (K, N)
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def _koleo(z: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator term: -mean log(distance to the nearest neighbour) of normalised z."""
    z = F.normalize(z, dim=-1)
    d = torch.cdist(z, z)
    d = d + torch.eye(len(z), dtype=d.dtype) * 1e4
    return -torch.log(d.min(1).values + 1e-8).mean()


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
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..models.weights import file_sha256

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
    from ..training.engine import native_bf16

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


def _config_json(cfg: PretrainConfig) -> dict:
    d = asdict(cfg)
    for k in ("device", "threads", "log_every", "checkpoint_every"):
        d.pop(k)
    return json.loads(json.dumps(d))


def _generator_version() -> str:
    from ..data.synthetic import GENERATOR_VERSION

    return GENERATOR_VERSION


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def extract_features(vit: nn.Module, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of normalised images: (class token ++ mean patch token) (N, 2C), patch maps (N, C, h, w)."""
    vit.eval()
    glob, maps = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        t = vit.forward_features(x)
        cls, patches = t[:, 0], t[:, vit.num_prefix_tokens:]
        h, w = x.shape[-2] // 14, x.shape[-1] // 14
        glob.append(torch.cat([cls, patches.mean(1)], 1))
        maps.append(patches.transpose(1, 2).reshape(len(x), -1, h, w))
    return torch.cat(glob), torch.cat(maps)


def _probe_data(preset: str, n_train: int, n_test: int, size: int, seed: int):
    from ..data.synthetic import activity_counts, preset_activities, render_sample, sample_rng
    from ..data.registry import DATASETS, SYNTHETIC_PRESETS

    spec = DATASETS[SYNTHETIC_PRESETS[preset]]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, masks, labels = [], [], []
        for name, count in activity_counts(preset, n).items():
            a = spec.activities.index(name)
            for k in range(count):
                img, mask = render_sample(preset, name, sample_rng(seed, preset, split, a, k), image_size=size)
                imgs.append(img)
                masks.append(mask)
                labels.append(a)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        out[split] = ((x - _MEAN) / _STD, torch.from_numpy(np.stack(masks)).long(), torch.tensor(labels))
    del preset_activities
    return out, spec


def evaluate_backbone(weights, backbone: str = "vit_mini_patch14", preset: str = "mtlesd", n_train: int = 192,
                      n_test: int = 96, image_size: int = 112, seed: int = 0, layerscale_init: float | None = None,
                      progress: bool = False) -> dict:
    """Linear probes of frozen features on a synthetic preset (the record's metrics).

    * ``linear_probe_accuracy``: activity from (class token ++ mean patch token) by multinomial logistic regression
      (scikit-learn, standardised features), trained on ``n_train`` images, tested on ``n_test``;
    * ``patch_probe_miou_fg``: segmentation from a per-patch linear layer on the frozen patch tokens, logits upsampled
      bilinearly, pixel cross-entropy (Adam, 300 steps): foreground mIoU on the test images.

    ``weights``: a file path, or None for the randomly initialised backbone (``layerscale_init`` to choose its
    LayerScale start).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ..metrics import segmentation_metrics
    from ..models.backbones import create_timm_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit, info = create_timm_backbone(backbone, image_size, pretrained=weights if weights is not None else False,
                                         layerscale_init=layerscale_init)
    data, spec = _probe_data(preset, n_train, n_test, image_size, seed)
    feats = {s: extract_features(vit, data[s][0]) for s in data}
    scaler = StandardScaler().fit(feats["train"][0].numpy())
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(feats["train"][0].numpy()),
                                                       data["train"][2].numpy())
    acc = float((clf.predict(scaler.transform(feats["test"][0].numpy())) == data["test"][2].numpy()).mean())
    s = spec.num_seg_classes
    mtr, mte = feats["train"][1], feats["test"][1]
    mu, sd = mtr.mean((0, 2, 3), keepdim=True), mtr.std((0, 2, 3), keepdim=True) + 1e-6
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Conv2d(mtr.shape[1], s, 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        ytr = data["train"][1]
        for _ in range(300):
            logits = F.interpolate(head((mtr - mu) / sd), size=ytr.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = F.interpolate(head((mte - mu) / sd), size=ytr.shape[-2:], mode="bilinear",
                             align_corners=False).argmax(1)
    seg = segmentation_metrics(pred.numpy(), data["test"][1].numpy(), s, compute_distances=False, compute_ssim=False)
    majority = float(np.bincount(data["test"][2].numpy()).max() / len(data["test"][2]))
    return {"probe_preset": f"synthetic {preset}", "probe_images": {"train": n_train, "test": n_test},
            "probe_image_size": image_size, "probe_seed": seed,
            "linear_probe_accuracy": round(acc, 4), "majority_accuracy": round(majority, 4),
            "patch_probe_miou_fg": round(float(seg["miou_fg"]), 4), "patch_probe_miou": round(float(seg["miou"]), 4),
            "weights": info["source"]}


_PROBE_KEYS = ("linear_probe_accuracy", "patch_probe_miou_fg", "patch_probe_miou")


def record_metrics(weights, backbone: str, layerscale_init: float, progress: bool = False) -> dict:
    """The weight record's metrics: :func:`evaluate_backbone` of the weights, and the same probes of the backbone
    left at its random initialisation with the LayerScale the pretraining started from, with LayerScale 1 (the fair
    random baseline: the strongest random features) and with timm's DINOv2 default (1e-5), so the record says what
    pretraining adds."""
    import warnings

    from ..models.weights import RandomInitWarning

    out = evaluate_backbone(weights, backbone, progress=progress)
    out["weights"] = Path(weights).name
    for key, ls in (("random_init", layerscale_init), ("random_init_layerscale_1", 1.0),
                    ("random_init_timm_layerscale", 1e-5)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomInitWarning)  # the point here
            base = evaluate_backbone(None, backbone, layerscale_init=ls)
        out[key] = {"layerscale_init": ls, **{k: base[k] for k in _PROBE_KEYS}}
    return out


# ------------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    from ..cli import add_standard_options, prog

    p = argparse.ArgumentParser(
        prog=prog("endoarss_lib.foundation", "endoarss-pretrain"),
        description="Pretrain the project's small DINOv2-architecture ViT with DINO + iBOT + KoLeo on unlabelled "
                    "synthetic endoscopic images; writes <out>/<name>.safetensors and <name>.json (the weight "
                    "record). Defaults reproduce the bundled weights (about 50 minutes on 2 CPU cores).")
    p.add_argument("--out", default="pretrain_out", help="output folder (default: pretrain_out)")
    p.add_argument("--no-eval", action="store_true", help="skip the linear probes at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_standard_options(p)
    for f in fields(PretrainConfig):
        default = f.default
        if isinstance(default, tuple):
            p.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", type=type(default[0]), default=default,
                           help=f"(default: {' '.join(map(str, default))})")
        elif isinstance(default, bool):
            from ..coerce import coerce

            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda v, n=f.name: coerce(n, v, bool),
                           default=default, help=f"true or false (default: {default})")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                           help=f"(default: {default})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0, 1 (a file cannot be written or read) or 2 (a bad option); ``--debug`` shows
    tracebacks."""
    from ..cli import run_command

    args = _parser().parse_args(argv)
    return run_command(lambda: _run(args), debug=args.debug, usage=(ValueError,))


def _run(args) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)}
    cfg = PretrainConfig(**values)
    record = pretrain(cfg, Path(args.out).expanduser(), progress=not args.quiet, evaluate=not args.no_eval)
    print(json.dumps({k: record[k] for k in ("name", "file", "sha256", "training")}, indent=2))
    if "metrics" in record:
        print(json.dumps(record["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
