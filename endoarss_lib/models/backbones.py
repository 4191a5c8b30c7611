"""Backbones from timm: DINOv2 ViT-B/14 and ViT-S/14 (frozen), ResNet-101 (trainable, dilated), and tiny test variants.

Configs are data (:data:`BACKBONES`); every entry, tiny ones included, is built by the same code path
(:func:`create_timm_backbone`). A backbone returns :class:`BackboneOutput`: ``maps`` (G, B, C, h, w), one spatial
feature map per group (G = 1, or one per TESLA task / MoE expert), and ``tokens`` (G, B, C_token) (the final-norm
class token; None for ResNet).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD
from .lora import QKV_CHUNKS, LoRAConv1x1, LoRALinear, route_to_group
from .pretrained import get_pretrained, is_pretrained_name, list_pretrained, verified_file
from .weights import (RandomInitWarning, WeightsError, file_sha256, hub_mode, hub_offline, load_state_dict_strict,
                      read_state_dict)

__all__ = ["BackboneConfig", "BACKBONES", "BackboneOutput", "create_timm_backbone", "ViTBackbone", "ResNetBackbone",
           "GroupBatchNorm2d", "build_backbone", "VIT_LORA_TARGETS", "OFFICIAL_WEIGHTS", "RANDOM", "needs_weights",
           "where_to_get_weights"]

VIT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class BackboneConfig:
    """One backbone: timm model name and size, whether its weights are frozen, what to load."""

    family: str  # "vit" | "resnet"
    timm_name: str
    embed_dim: int  # feature channels (ViT width, ResNet last-stage channels)
    depth: int  # transformer blocks / residual blocks
    num_heads: int = 0
    patch_size: int = 14  # ViT patch (the input side must be a multiple of it)
    frozen: bool = True
    warn_random_init: bool = True  # random init is loud for backbones that are meant to be pretrained
    has_weights: bool = True  # False for test-size variants: no published weights exist
    timm_kwargs: dict = field(default_factory=dict)
    ignore_unexpected: tuple = ()  # classifier keys a checkpoint may carry and the headless model drops
    description: str = ""
    mean: tuple = IMAGENET_MEAN  # input normalisation its published weights expect (DINOv2, timm's ResNets: ImageNet)
    std: tuple = IMAGENET_STD


BACKBONES: dict[str, BackboneConfig] = {
    "dinov2_vitb14": BackboneConfig(
        "vit", "vit_base_patch14_dinov2", 768, 12, 12, ignore_unexpected=("head.weight", "head.bias"),
        description="DINOv2 ViT-B/14 (paper default), 86 M frozen parameters"),
    "dinov2_vits14": BackboneConfig(
        "vit", "vit_small_patch14_dinov2", 384, 12, 6, ignore_unexpected=("head.weight", "head.bias"),
        description="DINOv2 ViT-S/14, 21 M frozen parameters"),
    "vit_tiny_patch14": BackboneConfig(
        "vit", "vit_small_patch14_dinov2", 64, 3, 2, warn_random_init=False, has_weights=False,
        timm_kwargs=dict(embed_dim=64, depth=3, num_heads=2, init_values=1.0),
        ignore_unexpected=("head.weight", "head.bias"),
        description="test-size DINOv2-style ViT (same timm class as DINOv2), width 64, 3 blocks; LayerScale starts "
                    "at 1 (not DINOv2's 1e-5) so that adapters on this random frozen test model change its features"),
    "vit_mini_patch14": BackboneConfig(
        "vit", "vit_small_patch14_dinov2", 192, 6, 3, has_weights=False,
        timm_kwargs=dict(embed_dim=192, depth=6, num_heads=3), ignore_unexpected=("head.weight", "head.bias"),
        description="DINOv2-architecture ViT, width 192, 6 blocks, 3 heads, patch 14, LayerScale (2.7 M): the "
                    "project's own foundation model (bundled weights 'synthdino_vit_mini14', pretrained by "
                    "endoarss_lib.foundation on synthetic images)"),
    "resnet101": BackboneConfig(
        "resnet", "resnet101", 2048, 33, patch_size=1, frozen=False, ignore_unexpected=("fc.weight", "fc.bias"),
        description="ResNet-101 (timm), trainable, dilated (output stride 16 or 8)"),
    "resnet_tiny": BackboneConfig(
        "resnet", "resnet101", 256, 4, patch_size=1, frozen=False, warn_random_init=False, has_weights=False,
        timm_kwargs=dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8),
        ignore_unexpected=("fc.weight", "fc.bias"),
        description="test-size ResNet (timm resnet101 code path, one bottleneck per stage, widths 8-64)"),
}


# The word that asks for a randomly initialised backbone explicitly (``model.pretrained=random``): the only way a
# frozen DINOv2 backbone trains without weights from the command line (see :func:`needs_weights`).
RANDOM = "random"

# Where the published weights of the DINOv2 backbones come from (facebookresearch/dinov2, Apache-2.0). The official
# .pth files load as they are (strict, through timm's checkpoint_filter_fn). sha256: None where this project has not
# recorded the file's digest (every run's result row records the digest of the file it used).
OFFICIAL_WEIGHTS: dict[str, dict] = {
    "dinov2_vitb14": {"file": "dinov2_vitb14_pretrain.pth", "what": "DINOv2 ViT-B/14 (LVD-142M, no registers)",
                      "url": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
                      "repository": "https://github.com/facebookresearch/dinov2",
                      "timm": "vit_base_patch14_dinov2.lvd142m", "sha256": None},
    "dinov2_vits14": {"file": "dinov2_vits14_pretrain.pth", "what": "DINOv2 ViT-S/14 (LVD-142M, no registers)",
                      "url": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
                      "repository": "https://github.com/facebookresearch/dinov2",
                      "timm": "vit_small_patch14_dinov2.lvd142m", "sha256": None},
}


def needs_weights(name: str, pretrained) -> bool:
    """Whether backbone ``name`` with ``pretrained`` would train a frozen backbone meant to be pretrained on random
    weights without having been asked to: a DINOv2 size (:data:`OFFICIAL_WEIGHTS`), frozen, ``pretrained`` False /
    None (not the explicit :data:`RANDOM`)."""
    cfg = BACKBONES.get(name)
    return (cfg is not None and name in OFFICIAL_WEIGHTS and cfg.frozen and cfg.has_weights
            and (pretrained is False or pretrained is None))


def where_to_get_weights(name: str, hub: bool = True) -> str:
    """How to get backbone ``name``'s published weights and pass them (file, source, sha256, override), in words
    (``hub``: also mention ``pretrained=True``)."""
    info = OFFICIAL_WEIGHTS.get(name)
    if info is None:
        return f"pass a weights file for {name!r} with model.pretrained=/path/to/weights.pth (or .safetensors)"
    digest = (f"sha256 {info['sha256']}" if info["sha256"] else
              "sha256: not known to this project (none is recorded here to check a download against; note the one "
              "of your file, `sha256sum FILE`: each run's result row records the digest of the file it used)")
    return (f"get the {info['what']} checkpoint {info['file']} from {info['url']} (official repository "
            f"{info['repository']}; the same weights, converted, are timm's {info['timm']} on the Hugging Face hub); "
            f"{digest}. "
            f"Pass it with model.pretrained=/path/to/{info['file']}"
            + (" (or model.pretrained=true to download timm's copy, unless HF_HUB_OFFLINE=1)" if hub else ""))


class BackboneOutput(NamedTuple):
    """Per-group spatial feature maps (G, B, C, h, w) and class tokens (G, B, C) or None."""

    maps: torch.Tensor
    tokens: torch.Tensor | None


def _timm_kwargs(cfg: BackboneConfig, image_size: int, output_stride: int, layerscale_init: float | None) -> dict:
    if cfg.family == "vit":
        kw = dict(img_size=image_size, num_classes=0, dynamic_img_size=True, **cfg.timm_kwargs)
        if layerscale_init is not None:
            kw["init_values"] = float(layerscale_init)
        return kw
    if layerscale_init is not None:
        raise ValueError(f"layerscale_init is a ViT option; {cfg.timm_name} has no LayerScale")
    return dict(num_classes=0, global_pool="", output_stride=output_stride, **cfg.timm_kwargs)


def create_timm_backbone(
    name: str,
    image_size: int = 224,
    pretrained: bool | str | os.PathLike = False,
    output_stride: int = 16,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    layerscale_init: float | None = None,
) -> tuple[nn.Module, dict]:
    """Create the timm model of backbone ``name`` and load its weights; returns (model, weights provenance).

    ``layerscale_init`` (ViT only): LayerScale start value of a randomly initialised ViT (None: the backbone's
    default, 1e-5 for DINOv2 layouts); loaded weights carry their own learned values.
    """
    cfg = BACKBONES[name]
    kwargs = _timm_kwargs(cfg, image_size, output_stride, layerscale_init)
    if pretrained is True:
        if not cfg.has_weights:
            raise WeightsError(f"backbone {name!r} is a test-size model: no pretrained weights exist "
                               "(use pretrained=False)")
        try:
            with hub_mode():
                model = timm.create_model(cfg.timm_name, pretrained=True, **kwargs)
        except Exception as e:  # offline hub, missing cache, network
            hint = (" Hub downloads are off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the deprecated "
                    "ENDOARSS_ALLOW_HUB=0) and the weights are not in the Hugging Face cache; unset it on a machine "
                    "with internet to download them." if hub_offline() else " Is the machine offline?")
            where = f" To {where_to_get_weights(name, hub=False)}." if name in OFFICIAL_WEIGHTS else ""
            raise WeightsError(
                f"pretrained=True could not fetch {cfg.timm_name} weights from the hub: {type(e).__name__}: {e}.{hint}"
                f" Pass a local file instead: pretrained='/path/to/checkpoint.pth' (official DINOv2 .pth or a "
                f".safetensors).{where}") from e
        return model, {"source": f"timm hub: {cfg.timm_name}", "sha256": None}
    model = timm.create_model(cfg.timm_name, pretrained=False, **kwargs)
    if pretrained is False or pretrained is None or pretrained == RANDOM:
        if cfg.warn_random_init:
            bundled = [n for n in list_pretrained() if get_pretrained(n).backbone == name]
            what = ("DINOv2" if name.startswith("dinov2") else "a pretrained foundation model" if cfg.family == "vit"
                    else "an ImageNet-pretrained " + name)
            fix = (f"pretrained={bundled[0]!r} (bundled)" if bundled else where_to_get_weights(name)
                   if name in OFFICIAL_WEIGHTS else "pretrained='/path/to/weights'")
            warnings.warn(
                f"backbone {name!r} is RANDOMLY INITIALISED (pretrained={pretrained!r}): results mean nothing about "
                f"{what}. For real runs: {fix} (a random frozen backbone is meant only as an ablation).",
                RandomInitWarning, stacklevel=3)
        return model, {"source": "random init", "sha256": None}
    record = None
    if is_pretrained_name(pretrained):  # a bundled weight record: sha256-checked file, same strict loading below
        record = verified_file(pretrained, backbone=name)
        path = os.fspath(record.file)
    else:
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path} (model.pretrained expects an existing .pth / "
                                    f".safetensors file, a bundled name {list_pretrained()}, {RANDOM!r} or false)")
    convert = None
    if cfg.family == "vit":
        convert = checkpoint_filter_fn  # official DINOv2 names (mask_token, w12/w3), pos_embed resampling
    load_state_dict_strict(model, read_state_dict(path), source=path, allow_missing=allow_missing,
                           allow_unexpected=tuple(allow_unexpected) + cfg.ignore_unexpected, convert=convert)
    if record is not None:
        return model, {"source": f"bundled: {record.name}", "sha256": record.sha256, "name": record.name}
    return model, {"source": os.path.abspath(path), "sha256": file_sha256(path)}


def _check_images(images: torch.Tensor, multiple: int, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if multiple > 1 and (images.shape[2] % multiple or images.shape[3] % multiple):
        raise ValueError(f"image size {tuple(images.shape[2:])} must be a multiple of {multiple} ({what})")


class _Backbone(nn.Module):
    """Shared parts: SMA in front, weights provenance, grouping state."""

    family = ""

    def __init__(self, name: str, cfg: BackboneConfig, sma: nn.Module | None):
        super().__init__()
        self.name, self.cfg = name, cfg
        if sma is not None:
            self.sma = sma
        else:
            self.sma = None
        self.num_groups = 1  # G: groups in the task/expert-major batch the backbone returns
        self.expand_at = 0  # index of the first block that runs on the G-times-repeated batch
        self.input_multiple = 1

    def _set_weights(self, info: dict) -> None:
        self.weights = info
        self.pretrained_random_init = info["source"] == "random init"

    def _pre(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.input_multiple, f"{self.name}"
                      + (f" and SMA patch size {self.sma.patch_size}" if self.sma is not None else ""))
        return self.sma(images) if self.sma is not None else images

    def _route(self, group: int | None):
        return route_to_group(self, group) if group is not None else nullcontext()


class ViTBackbone(_Backbone):
    """Frozen timm ViT (DINOv2 layout) with optional SMA, LoRA / TESLA / expert adapters; patch tokens -> (C, h, w)."""

    family = "vit"

    def __init__(self, name: str, image_size: int = 224, pretrained=False, sma: nn.Module | None = None,
                 out_layers: Sequence[int] = (-1,), allow_missing: Sequence[str] = (),
                 allow_unexpected: Sequence[str] = (), layerscale_init: float | None = None):
        cfg = BACKBONES[name]
        super().__init__(name, cfg, sma)
        if image_size % cfg.patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of the patch size {cfg.patch_size}")
        vit, info = create_timm_backbone(name, image_size, pretrained, allow_missing=allow_missing,
                                         allow_unexpected=allow_unexpected, layerscale_init=layerscale_init)
        self.vit = vit
        self._set_weights(info)
        if cfg.frozen:
            self.vit.requires_grad_(False)
        depth = len(self.vit.blocks)
        layers = [int(i) % depth for i in out_layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"out_layers={tuple(out_layers)} must name distinct blocks of {depth}")
        self.out_layers = tuple(layers)
        self.depth = depth
        self.embed_dim = cfg.embed_dim
        self.out_channels = cfg.embed_dim * len(layers)
        self.token_dim = cfg.embed_dim
        self.stride = cfg.patch_size
        self.input_multiple = cfg.patch_size

    def add_adapters(
        self,
        rank: int = 4,
        alpha: float | None = None,
        targets: Sequence[str] = ("attn.qkv",),
        qkv: Sequence[str] = ("q", "v"),
        num_groups: int = 0,
        group_kind: str = "tesla",
        group_targets: Sequence[str] | None = None,
        group_rank: int | None = None,
        group_alpha: float | None = None,
        soft: bool = False,
        num_adapters: int | None = None,
        last_k: int | None = None,
    ) -> None:
        """Wrap target linears of every block in :class:`LoRALinear` (shared LoRA; groups in the last ``last_k``)."""
        targets = tuple(targets) if rank else ()
        group_targets = tuple(targets if group_targets is None else group_targets) if num_groups else ()
        for t in targets + group_targets:
            if t not in VIT_LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; valid: {VIT_LORA_TARGETS}")
        bad = [c for c in qkv if c not in QKV_CHUNKS]
        if bad or not qkv:
            raise ValueError(f"lora_qkv={tuple(qkv)} must name some of {tuple(QKV_CHUNKS)}")
        last_k = self.depth if last_k is None else int(last_k)
        if num_groups and not 1 <= last_k <= self.depth:
            raise ValueError(f"last_k={last_k} must be in [1, {self.depth}]")
        first = self.depth - last_k if num_groups else self.depth
        for i, blk in enumerate(self.vit.blocks):
            gts = group_targets if i >= first else ()
            for path in dict.fromkeys(targets + gts):
                parent_path, attr = path.rsplit(".", 1)
                parent = blk.get_submodule(parent_path)
                base = getattr(parent, attr)
                if isinstance(base, LoRALinear):
                    raise RuntimeError(f"block {i} {path} already carries adapters")
                chunks, adapt = (3, [QKV_CHUNKS[c] for c in qkv]) if attr == "qkv" else (1, None)
                setattr(parent, attr, LoRALinear(
                    base, rank=rank if path in targets else 0, alpha=alpha, chunks=chunks, adapt=adapt,
                    num_groups=num_groups if path in gts else 0, group_rank=group_rank or rank,
                    group_alpha=group_alpha, kind=group_kind, soft=soft, num_adapters=num_adapters))
        if num_groups:
            self.num_groups, self.expand_at = num_groups, first

    def forward(self, images: torch.Tensor, group: int | None = None) -> BackboneOutput:
        """(B, 3, H, W) -> maps (G, B, C, H/14, W/14), tokens (G, B, C); ``group`` runs one group's adapters only."""
        x = self._pre(images)
        b, h, w = images.shape[0], images.shape[2] // self.stride, images.shape[3] // self.stride
        g = 1 if group is not None else self.num_groups
        v = self.vit
        with self._route(group):
            x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
            outs = []
            for i, blk in enumerate(v.blocks):
                if g > 1 and i == self.expand_at:
                    x = x.repeat(g, 1, 1)  # task/expert-major: rows [t*B, (t+1)*B) belong to group t
                x = blk(x)
                if i in self.out_layers:
                    outs.append((self.out_layers.index(i), x))
        feats = []
        for _, t in sorted(outs):
            if t.shape[0] != g * b:  # an out layer before the group split
                t = t.repeat(g, 1, 1)
            feats.append(v.norm(t))
        npt = v.num_prefix_tokens
        maps = torch.cat([f[:, npt:].transpose(1, 2).reshape(g * b, self.embed_dim, h, w) for f in feats], dim=1)
        tok = feats[-1][:, 0] if getattr(v, "cls_token", None) is not None else None
        maps = maps.reshape(g, b, self.out_channels, h, w)
        return BackboneOutput(maps, None if tok is None else tok.reshape(g, b, self.token_dim))


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d for a group-major batch (TESLA on a ResNet): training statistics are computed per group, so the
    tasks never mix, and every group keeps its **own** running mean / variance (``group_running_mean`` /
    ``group_running_var``, shape (G, C)), which evaluation uses for that group's rows. ``running_mean`` /
    ``running_var`` keep the groups' average (what a plain BatchNorm of the same model would hold)."""

    groups: int = 1
    forced_group: int | None = None

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, groups: int) -> "GroupBatchNorm2d":
        """Copy of ``bn`` (same parameters and buffers) with per-group training and running statistics, every group
        starting from ``bn``'s running statistics."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        new.groups = groups
        if bn.track_running_stats:
            new.register_buffer("group_running_mean", bn.running_mean.detach().clone().repeat(groups, 1))
            new.register_buffer("group_running_var", bn.running_var.detach().clone().repeat(groups, 1))
        return new

    def _update_groups(self, mean: torch.Tensor, var: torch.Tensor, ids: list[int]) -> None:
        """Momentum update of groups ``ids``' running statistics from their batch ``mean`` and unbiased ``var``
        (len(ids), C); the plain running statistics become the groups' average."""
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
            mean, var = mean.to(self.group_running_mean.dtype), var.to(self.group_running_var.dtype)
            self.group_running_mean[ids] = self.group_running_mean[ids] * (1 - m) + mean * m
            self.group_running_var[ids] = self.group_running_var[ids] * (1 - m) + var * m
            self.running_mean.copy_(self.group_running_mean.mean(0))
            self.running_var.copy_(self.group_running_var.mean(0))

    def _normalise_groups(self, xg: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          ids: list[int]) -> torch.Tensor:
        """BatchNorm of ``xg`` (N', G' * C, H, W: groups ``ids`` along the channels), updating their running
        statistics in training. Data parallel overrides this (global-batch statistics); the grouping stays here."""
        if self.training or not self.track_running_stats:
            y = F.batch_norm(xg, None, None, weight, bias, True, 0.0, self.eps)
            if self.track_running_stats and self.training:
                with torch.no_grad():
                    c = self.num_features
                    self._update_groups(xg.mean(dim=(0, 2, 3)).view(len(ids), c),
                                        xg.var(dim=(0, 2, 3), unbiased=True).view(len(ids), c), ids)
            return y
        return F.batch_norm(xg, self.group_running_mean[ids].reshape(-1), self.group_running_var[ids].reshape(-1),
                            weight, bias, False, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = [self.forced_group] if self.forced_group is not None else list(range(self.groups))
        g = len(ids)
        n, c, h, w = x.shape
        if n % g:
            raise ValueError(f"batch {n} is not a multiple of the {g} task groups (task-major concatenation)")
        xg = x.reshape(g, n // g, c, h, w).transpose(0, 1).reshape(n // g, g * c, h, w)
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        y = self._normalise_groups(xg, weight, bias, ids)
        return y.reshape(n // g, g, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def _resnet_blocks(net: nn.Module) -> list[nn.Module]:
    return [blk for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for blk in layer]


class ResNetBackbone(_Backbone):
    """Trainable timm ResNet, dilated to output stride 16 or 8, last-stage map; optional expert copies / TESLA."""

    family = "resnet"

    def __init__(self, name: str, image_size: int = 224, pretrained=False, sma: nn.Module | None = None,
                 output_stride: int = 16, num_experts: int = 0, allow_missing: Sequence[str] = (),
                 allow_unexpected: Sequence[str] = ()):
        cfg = BACKBONES[name]
        super().__init__(name, cfg, sma)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"resnet_output_stride must be 8, 16 or 32, got {output_stride}")
        kw = dict(image_size=image_size, output_stride=output_stride, allow_missing=allow_missing,
                  allow_unexpected=allow_unexpected)
        net, info = create_timm_backbone(name, pretrained=pretrained, **kw)
        self._set_weights(info)
        if num_experts > 1:
            # MMoE / DSelect-k on a trainable CNN: E full copies (LibMTL parity). Pretrained copies start equal;
            # random ones are initialised independently.
            nets = [net]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomInitWarning)
                for _ in range(num_experts - 1):
                    nets.append(copy.deepcopy(net) if not self.pretrained_random_init
                                else create_timm_backbone(name, pretrained=False, **kw)[0])
            self.experts = nn.ModuleList(nets)
            self.num_groups = num_experts
        else:
            self.resnet = net
        self.embed_dim = self.out_channels = net.num_features
        self.token_dim = None
        self.stride = output_stride
        self.depth = len(_resnet_blocks(net))

    def add_adapters(self, num_groups: int, group_rank: int, group_alpha: float | None = None,
                     soft: bool = False, num_adapters: int | None = None, last_k: int | None = None) -> None:
        """TESLA on ResNet: per-task low-rank adapters on the 1x1 convs of the last ``last_k`` bottlenecks."""
        if not hasattr(self, "resnet"):
            raise RuntimeError("adapters on an expert-copy ResNet are not supported")
        blocks = _resnet_blocks(self.resnet)
        last_k = len(blocks) if last_k is None else int(last_k)
        if not 1 <= last_k <= len(blocks):
            raise ValueError(f"last_k={last_k} must be in [1, {len(blocks)}]")
        first = len(blocks) - last_k
        for blk in blocks[first:]:
            for attr in ("conv1", "conv3"):
                conv = getattr(blk, attr, None)
                if conv is not None and conv.kernel_size == (1, 1) and conv.stride == (1, 1):
                    setattr(blk, attr, LoRAConv1x1(conv, rank=0, num_groups=num_groups, group_rank=group_rank,
                                                   group_alpha=group_alpha, kind="tesla", soft=soft,
                                                   num_adapters=num_adapters))
            # Batch statistics must not mix the tasks of the concatenated batch (gradient isolation).
            for mname, mod in list(blk.named_modules()):
                if isinstance(mod, nn.BatchNorm2d) and not isinstance(mod, GroupBatchNorm2d):
                    parent = blk.get_submodule(mname.rsplit(".", 1)[0]) if "." in mname else blk
                    setattr(parent, mname.rsplit(".", 1)[-1], GroupBatchNorm2d.from_bn(mod, num_groups))
        self.num_groups, self.expand_at = num_groups, first

    def _run(self, net: nn.Module, x: torch.Tensor, g: int) -> torch.Tensor:
        x = net.maxpool(net.act1(net.bn1(net.conv1(x))))
        for i, blk in enumerate(_resnet_blocks(net)):
            if g > 1 and i == self.expand_at:
                x = x.repeat(g, 1, 1, 1)
            x = blk(x)
        return x

    def forward(self, images: torch.Tensor, group: int | None = None) -> BackboneOutput:
        """(B, 3, H, W) -> maps (G, B, C, H/s, W/s) (s = output stride), tokens None."""
        x = self._pre(images)
        b = images.shape[0]
        if hasattr(self, "experts"):
            nets = self.experts if group is None else [self.experts[group]]
            maps = torch.stack([self._run(n, x, 1) for n in nets])
            return BackboneOutput(maps, None)
        g = 1 if group is not None else self.num_groups
        with self._route(group):
            y = self._run(self.resnet, x, g)
        return BackboneOutput(y.reshape(g, b, *y.shape[1:]), None)


def build_backbone(name: str, image_size: int = 224, pretrained=False, sma: nn.Module | None = None, **kwargs):
    """Backbone module for ``name`` (see :data:`BACKBONES`)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
    cls = ViTBackbone if BACKBONES[name].family == "vit" else ResNetBackbone
    bb = cls(name, image_size=image_size, pretrained=pretrained, sma=sma, **kwargs)
    if sma is not None:
        bb.input_multiple = _lcm(bb.input_multiple, sma.patch_size)
    return bb


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)
