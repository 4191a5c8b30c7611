"""The self-distillation objective: student and momentum teacher (a timm ViT of DINOv2's layout that can mask patch
tokens, :class:`_Encoder`, with a DINO and an iBOT head each) and :class:`SelfDistillation`, whose forward pass
returns the DINO (class token, multi-crop), iBOT (masked patch tokens) and KoLeo losses and their weighted sum."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import create_timm_backbone
from .heads import DINOHead
from .losses import _koleo, sinkhorn_knopp
from .recipe import PretrainConfig

__all__ = ["SelfDistillation"]


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
