"""The authors' released EndoARSS model, rebuilt with their parameter names so their checkpoints load strictly.

The authors published two trained checkpoints (MTLESD: ``mtl_MOLA_DB_MTL_best_cls_w=1_seg_w=1_dinonet.pt``,
MTLEndovis: ``mtl_MOLA_STCH_best_cls_w=1_seg_w=1_dinonet.pt``). They hold ``state_dict()`` of LibMTL's ``MOLA``
architecture with the ``dinonet`` encoder, which is **not** the model the paper describes (``docs/paper_vs_code.md``).
This module rebuilds that model exactly, from a reading of the released source (repository ``gkw0010/EndoARSS``):

* ``ds_train.py``: encoder ``Dinov2WithLoRA(backbone_size="base", r=4, image_shape=(224, 224), lora_type="dvlora",
  residual_block_indexes=[])``; heads ``DeepLabHead(256, S)`` and ``DeepLabClassHead(256, K)`` in a ModuleDict
  ``{"segmentation", "classification"}``; ``params.img_size = (244, 244)``; ``process_preds`` upsamples the
  segmentation logits to 244 x 244 (bilinear, ``align_corners=True``).
* ``create_dataset.py``: images resized to 244 x 244 (PIL) and divided by 255, **no** mean / std normalisation.
* ``LibMTL/architecture/MOLA.py`` + ``abstract_arch.py``: one shared encoder, one decoder per task (hard parameter
  sharing); the trainer saves ``self.model.state_dict()``: keys ``encoder.*`` and ``decoders.<task>.*`` (the
  weighting classes register no tensors).
* ``LibMTL/model/dinov2.py``: ``Dinov2WithLoRA`` resizes its input to ``image_shape`` (bilinear,
  ``align_corners=True``), replaces every block's ``mlp.fc1`` / ``mlp.fc2`` by ``DVLinear`` (rank 4,
  ``lora_alpha = r``), keeps the ViT as attribute ``encoder`` (so keys are ``encoder.encoder.*``), takes the last
  block's normed patch tokens ``(B, 256, 768)`` and returns ``features.view(B, 256, 16, 48)``: the 256 tokens become
  channels. ``mark_only_part_as_trainable`` freezes everything in the ViT except ``lora_A`` / ``lora_B``.
* ``LibMTL/model/dino_backbones/vision_transformer.py``: DINOv2's ``DinoVisionTransformer`` via ``vit_base``
  (img_size 518 -> ``pos_embed`` (1, 1370, 768), patch 14, LayerScale ``init_values=1e-5``, ``block_chunks=0``,
  ``mask_token``, no register tokens, LayerNorm eps 1e-6, qkv bias), plus ``self.mob = MobileViTAttention(3)`` run on
  the image before the patch embedding; positional embeddings are bicubically interpolated with DINOv2's
  ``interpolate_offset = 0.1`` trick.
* ``LibMTL/model/dino_backbones/layers/Mobile.py``: ``MobileViTAttention(in_channel=3, dim=512, kernel_size=3,
  patch_size=7)``: ``conv1`` (3x3), ``conv2`` (1x1 -> 512), ``trans`` (a 3-layer MobileViT transformer, 8 heads of
  64, MLP 1024: **built but never called**; 6.3 M dead parameters), ``ema`` (EMA over the 49 in-patch positions),
  ``conv3`` (1x1 -> 3), ``conv4`` (3x3 on the concatenation with the input).
* ``LibMTL/model/dino_backbones/mylora/layers.py``: ``DVLinear``: ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_U``
  (r, 1), ``lora_V`` (out, 1); ``y = W x + b + s (B * V)(A * U) x`` (``s = alpha / r = 1``), see
  :class:`DVLoRALinear`.
* ``aspp.py``: torchvision's DeepLab-V3 head layout (ASPP rates 12 / 24 / 36, 256 channels, dropout 0.5), and a class
  head ``Conv3x3(256) -> BN -> ReLU -> GAP -> Flatten -> Linear(K)``.
* The Block (``layers/block.py``) is EndoDAC's (``BeileiCui/EndoDAC``): DINOv2's block (``norm1, attn.qkv, attn.proj,
  ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma``) whose optional ``residual_`` branch is off here.

The code below is this project's own; only the layout (names, shapes, order of operations) follows the source.
Entry points: :func:`load_released_checkpoint` (their file -> a model the engine evaluates unchanged) and
:func:`build_released_model` (random weights, for tests and for the ``--random-init`` CLI).
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from ..data import get_spec
from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD
from .connectors import released_grid, released_token_map
from .sma import EMA, patchify, unpatchify
from .weights import RandomInitWarning, WeightsError, file_sha256, why_unreadable

__all__ = ["ReleasedConfig", "ReleasedModel", "ReleasedEncoder", "ReleasedViT", "ReleasedSMA", "DVLoRALinear",
           "DeepLabClassHead", "build_released_model", "load_released_checkpoint", "read_released_state_dict",
           "released_task_sizes", "to_released_input", "RELEASED_CHECKPOINTS", "RELEASED_TASK_NAMES",
           "INPUT_NORMALISATIONS"]

#: The published checkpoints, per dataset (file names as released).
RELEASED_CHECKPOINTS = {"mtlesd": "mtl_MOLA_DB_MTL_best_cls_w=1_seg_w=1_dinonet.pt",
                        "mtlendovis": "mtl_MOLA_STCH_best_cls_w=1_seg_w=1_dinonet.pt"}
#: This project's task names -> the released ``decoders`` keys.
RELEASED_TASK_NAMES = {"cls": "classification", "seg": "segmentation"}
#: What ``forward`` may receive: ``"imagenet"`` (``MTLDataset``'s ImageNet-normalised tensors; undone inside
#: ``forward``) or ``"unit"`` (already the released convention, pixel / 255 in [0, 1]).
INPUT_NORMALISATIONS = ("imagenet", "unit")

_SEG_LAST = "decoders.segmentation.4.weight"  # (S, 256, 1, 1): the 1x1 classifier of DeepLabHead
_CLS_LAST = "decoders.classification.5.weight"  # (K, 256): the Linear of DeepLabClassHead
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ReleasedConfig:
    """The released architecture; every default is the released value (test sizes override the widths)."""

    num_activities: int = 3  # K: MTLESD 3, MTLEndovis 12 (ds_train.py: ClassMetric(3), DeepLabClassHead(256, 3))
    num_seg_classes: int = 7  # S incl. background: MTLESD 7, MTLEndovis 8
    image_size: int = 244  # data / evaluation resolution (ds_train.py: params.img_size = (244, 244))
    internal_size: int = 224  # Dinov2WithLoRA(image_shape=(224, 224)) resizes its input to this
    img_size: int = 518  # vit_base(img_size=518): the pos_embed grid is img_size / patch = 37 per side
    patch_size: int = 14
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5  # vit_base(init_values=1e-5); a checkpoint carries its own gamma values
    interpolate_offset: float = 0.1  # DINOv2's pos-embed interpolation offset
    lora_rank: int = 4  # Dinov2WithLoRA(r=4): DVLinear(r=4, lora_alpha=4)
    lora_alpha: float | None = None  # None -> lora_rank (scaling 1, as released)
    sma_dim: int = 512  # MobileViTAttention(dim=512)
    sma_patch_size: int = 7
    sma_kernel_size: int = 3
    sma_depth: int = 3  # the unused transformer: Transformer(dim, depth=3, heads=8, head_dim=64, mlp_dim=1024)
    sma_heads: int = 8
    sma_head_dim: int = 64
    sma_mlp_dim: int = 1024
    aspp_rates: tuple = (12, 24, 36)  # aspp.py: DeepLabHead -> ASPP(in_channels, [12, 24, 36])

    def __post_init__(self):
        self.aspp_rates = tuple(self.aspp_rates)
        self.validate()

    @property
    def num_tokens(self) -> int:
        """Patch tokens of the resized input: the heads' input channels (256 at the released size)."""
        return (self.internal_size // self.patch_size) ** 2

    @property
    def grid(self) -> tuple[int, int]:
        """The "image" the released view makes of the feature dimensions: (16, 48) for 768."""
        return released_grid(self.embed_dim)

    def to_dict(self) -> dict:
        """Plain dict (for result rows)."""
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError on an inconsistent configuration."""
        for name in ("num_activities", "num_seg_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an int >= 2, got {v!r}")
        for name in ("image_size", "internal_size", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
                     "lora_rank", "sma_dim", "sma_patch_size", "sma_kernel_size", "sma_depth", "sma_heads",
                     "sma_head_dim", "sma_mlp_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.internal_size % self.patch_size or self.img_size % self.patch_size:
            raise ValueError(f"internal_size={self.internal_size} and img_size={self.img_size} must be multiples of "
                             f"patch_size={self.patch_size}")
        if self.internal_size % self.sma_patch_size:
            raise ValueError(f"internal_size={self.internal_size} must be a multiple of sma_patch_size="
                             f"{self.sma_patch_size} (the SMA unfolds the resized image; released: 224 = 32 x 7)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.sma_kernel_size % 2 == 0:
            raise ValueError(f"sma_kernel_size must be odd, got {self.sma_kernel_size}")
        if len(self.aspp_rates) != 3:
            raise ValueError(f"aspp_rates must hold three rates, got {self.aspp_rates!r}")


# ---------------------------------------------------------------------------------------------------------------
# DV-LoRA and the DINOv2-code ViT
# ---------------------------------------------------------------------------------------------------------------

class DVLoRALinear(nn.Linear):
    """EndoDAC's "DV-LoRA" linear layer (released ``mylora/layers.py: DVLinear``), with its parameter names.

    ``y = x W^T + b + s * (x (A * U)^T) (B * V)^T`` with ``A`` (r, in), ``B`` (out, r), ``U`` (r, 1) scaling the
    rows of ``A`` and ``V`` (out, 1) scaling the rows of ``B``, ``s = alpha / r``. So the update of ``W`` is
    ``s * diag(V) B diag(U) A``. Initialisation as released: ``A``, ``U``, ``V`` Kaiming-uniform (``a = sqrt(5)``;
    for the (n, 1) vectors that is U(-1, 1)), ``B`` zeros (the layer starts equal to the base linear). The released
    freezing rule trains only ``lora_A`` / ``lora_B``: ``W``, ``b``, ``U``, ``V`` are frozen (U and V stay at their
    random initial values, which a checkpoint stores).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 4, alpha: float | None = None,
                 bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.lora_U = nn.Parameter(torch.empty(rank, 1))
        self.lora_V = nn.Parameter(torch.empty(out_features, 1))
        for p in (self.lora_A, self.lora_U, self.lora_V):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        for p in (self.weight, self.bias, self.lora_U, self.lora_V):
            if p is not None:
                p.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``s * (B * V) @ (A * U)`` (out, in) that the forward adds to ``W``."""
        return self.scaling * (self.lora_B * self.lora_V) @ (self.lora_A * self.lora_U)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + (x @ (self.lora_A * self.lora_U).T @ (self.lora_B * self.lora_V).T) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


class _PatchEmbed(nn.Module):
    """DINOv2 ``PatchEmbed``: a p x p stride-p convolution (no norm), tokens in raster order."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """DINOv2 ``Attention``: fused ``qkv`` (with bias), softmax(q k^T / sqrt(d)) v per head, ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _LayerScale(nn.Module):
    """DINOv2 ``LayerScale``: per-channel ``gamma``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    """DINOv2 ``Mlp`` with both linears replaced by :class:`DVLoRALinear` (released ``lora_type="dvlora"``)."""

    def __init__(self, dim: int, hidden: int, rank: int, alpha: float | None):
        super().__init__()
        self.fc1 = DVLoRALinear(dim, hidden, rank, alpha)
        self.act = nn.GELU()
        self.fc2 = DVLoRALinear(hidden, dim, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """DINOv2 / EndoDAC ``Block`` (no residual conv branch): pre-norm attention and MLP, each LayerScaled."""

    def __init__(self, cfg: ReleasedConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, cfg.num_heads)
        self.ls1 = _LayerScale(dim, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio), cfg.lora_rank, cfg.lora_alpha)
        self.ls2 = _LayerScale(dim, cfg.layerscale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------------------------
# The released SMA: MobileViTAttention with EMA and an unused transformer
# ---------------------------------------------------------------------------------------------------------------

class _PreNorm(nn.Module):
    """MobileViT ``PreNorm`` container (``ln``, ``fn``); part of the unused transformer."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fn = fn


class _MViTAttention(nn.Module):
    """MobileViT attention parameters (``to_qkv`` without bias, ``to_out.0``); part of the unused transformer."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = (nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0)) if not (heads == 1 and head_dim == dim)
                       else nn.Identity())


class _FeedForward(nn.Module):
    """MobileViT feed-forward parameters (``net.0``, ``net.3``); part of the unused transformer."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mlp_dim), nn.SiLU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.0))


class _UnusedTransformer(nn.Module):
    """The MobileViT transformer the released SMA builds as ``trans`` and **never calls** (EMA replaced it in the
    forward). Present only so that the checkpoint's ``mob.trans.*`` tensors (6.3 M at the released size) load."""

    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([_PreNorm(dim, _MViTAttention(dim, heads, head_dim)),
                           _PreNorm(dim, _FeedForward(dim, mlp_dim))])
            for _ in range(depth)])

    def forward(self, x):  # pragma: no cover - never part of the released forward
        raise RuntimeError("the released SMA never runs its MobileViT transformer; it only carries its parameters")


class ReleasedSMA(nn.Module):
    """The released SMA (``Mobile.py: MobileViTAttention``), frozen at its random initialisation by the released
    freezing rule: (B, C, H, W) -> (B, C, H, W), H and W divisible by ``patch_size``.

    ``y = conv2(conv1(x))`` (C -> dim), unfold into (B, P = p*p, N = HW / P, dim), EMA over the P in-patch positions
    (as channels), fold back, ``conv3`` (dim -> C), ``conv4`` (3x3) on ``cat([x, y])``. ``trans`` is built, unused.
    """

    def __init__(self, in_channel: int = 3, dim: int = 512, kernel_size: int = 3, patch_size: int = 7,
                 depth: int = 3, heads: int = 8, head_dim: int = 64, mlp_dim: int = 1024):
        super().__init__()
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(in_channel, in_channel, kernel_size=kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(in_channel, dim, kernel_size=1)
        self.trans = _UnusedTransformer(dim, depth, heads, head_dim, mlp_dim)
        self.ema = EMA(patch_size * patch_size, groups=1)  # same layout as the released EMA: gn, conv1x1, conv3x3
        self.conv3 = nn.Conv2d(dim, in_channel, kernel_size=1)
        self.conv4 = nn.Conv2d(2 * in_channel, in_channel, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"SMA input {h}x{w} must be divisible by patch_size={self.patch_size}")
        y = self.conv2(self.conv1(x))
        y = unpatchify(self.ema(patchify(y, self.patch_size)), (h, w), self.patch_size)
        return self.conv4(torch.cat([x, self.conv3(y)], dim=1))


class ReleasedViT(nn.Module):
    """DINOv2-code ``DinoVisionTransformer`` as the released ``vit_base`` builds it, SMA (``mob``) in front."""

    def __init__(self, cfg: ReleasedConfig):
        super().__init__()
        c = cfg
        self.patch_size = c.patch_size
        self.interpolate_offset = c.interpolate_offset
        self.patch_embed = _PatchEmbed(c.patch_size, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (c.img_size // c.patch_size) ** 2 + 1, c.embed_dim))
        self.blocks = nn.ModuleList([_Block(c) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, c.embed_dim))  # DINOv2's masking token (unused here)
        self._init_weights()
        self.mob = ReleasedSMA(3, c.sma_dim, c.sma_kernel_size, c.sma_patch_size, c.sma_depth, c.sma_heads,
                               c.sma_head_dim, c.sma_mlp_dim)

    def _init_weights(self) -> None:
        # DINOv2's init (trunc-normal pos_embed, tiny cls_token, timm's Linear init); the DV-LoRA linears replace
        # fc1 / fc2 after this in the released code and keep their own (nn.Linear) init; SMA is built after it.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if type(m) is nn.Linear:
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """DINOv2's positional embedding for an ``height x width`` input: the stored grid, or its bicubic resize with
        ``scale = (side // patch + offset) / sqrt(N)`` (the offset also enters the sampling positions)."""
        n = self.pos_embed.shape[1] - 1
        if num_patches == n and height == width:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim = pos.shape[-1]
        side = int(math.sqrt(n))
        h0 = height // self.patch_size + self.interpolate_offset
        w0 = width // self.patch_size + self.interpolate_offset
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
        if grid.shape[-2:] != (int(h0), int(w0)):
            raise RuntimeError(f"pos-embed interpolation gave a {tuple(grid.shape[-2:])} grid, expected "
                               f"{(int(h0), int(w0))}")
        patch = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([pos[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last block's final-normed patch tokens (B, H/p * W/p, C), class token dropped."""
        _, _, h, w = x.shape
        x = self.patch_embed(self.mob(x))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]


class ReleasedEncoder(nn.Module):
    """Released ``Dinov2WithLoRA``: resize to ``internal_size`` (bilinear, ``align_corners=True``), ViT, then
    ``view(B, N, gh, gw)`` of the patch tokens (tokens become channels; (B, 256, 16, 48) at the released size)."""

    def __init__(self, cfg: ReleasedConfig):
        super().__init__()
        self.internal_size = cfg.internal_size
        self.grid = cfg.grid
        self.encoder = ReleasedViT(cfg)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """The released internal resize (244 -> 224)."""
        return F.interpolate(x, size=(self.internal_size, self.internal_size), mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return released_token_map(self.encoder.tokens(self.resize(x)), self.grid)


# ---------------------------------------------------------------------------------------------------------------
# Heads and the whole model
# ---------------------------------------------------------------------------------------------------------------

class DeepLabClassHead(nn.Sequential):
    """Released ``aspp.py: DeepLabClassHead``: Conv3x3 (no bias, 256) -> BN -> ReLU -> GAP -> Flatten -> Linear(K)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def to_released_input(images: torch.Tensor, normalisation: str = "imagenet") -> torch.Tensor:
    """Convert ``images`` to the released input convention (pixel / 255, no mean / std).

    ``"imagenet"``: ``images`` are ImageNet-normalised (``MTLDataset``): returns ``images * std + mean``.
    ``"unit"``: ``images`` already are pixel / 255: returned unchanged.
    """
    if normalisation == "unit":
        return images
    if normalisation != "imagenet":
        raise ValueError(f"normalisation={normalisation!r}: expected one of {INPUT_NORMALISATIONS}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * std + mean


class ReleasedModel(nn.Module):
    """The released MOLA model (hard parameter sharing): ``encoder`` (:class:`ReleasedEncoder`) and ``decoders``
    ``{"segmentation": DeepLabHead, "classification": DeepLabClassHead}``, keys exactly as the authors' files.

    ``forward(images)`` returns ``{"cls": (B, K), "seg": (B, S, H, W)}`` at the input resolution (the released code
    upsamples the 16 x 48 logits bilinearly with ``align_corners=True``). ``input_normalisation`` says what
    ``images`` are: ``"imagenet"`` (default: ``MTLDataset`` tensors, un-normalised to pixel / 255 inside ``forward``,
    so ``engine.evaluate`` / ``predict`` / robustness feed it unchanged) or ``"unit"`` (already pixel / 255).
    """

    arch = "released"

    def __init__(self, config: ReleasedConfig, input_normalisation: str = "imagenet"):
        super().__init__()
        if input_normalisation not in INPUT_NORMALISATIONS:
            raise ValueError(f"input_normalisation={input_normalisation!r}: expected one of {INPUT_NORMALISATIONS}")
        self.config = config
        self.tasks = ("cls", "seg")
        self.input_normalisation = input_normalisation
        self.preprocessing = {"image_size": config.image_size, "internal_size": config.internal_size,
                              "scale": "1/255", "mean": None, "std": None,
                              "resize": "PIL bicubic to image_size in the released loader; bilinear "
                                        "(align_corners=True) to internal_size inside the encoder"}
        self.weights = {"source": "random init", "sha256": None}
        self.pretrained_random_init = True
        self.encoder = ReleasedEncoder(config)
        n = config.num_tokens
        self.decoders = nn.ModuleDict({
            "segmentation": DeepLabHead(n, config.num_seg_classes, atrous_rates=config.aspp_rates),
            "classification": DeepLabClassHead(n, config.num_activities)})
        self.freeze_as_released()

    def freeze_as_released(self) -> "ReleasedModel":
        """The released ``mark_only_part_as_trainable``: in the ViT (SMA included) only ``lora_A`` / ``lora_B``
        train; the heads are trainable."""
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
        self.decoders.requires_grad_(True)
        return self

    def to_released_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (as ``input_normalisation`` says) -> pixel / 255, the released input convention."""
        return to_released_input(images, self.input_normalisation)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The map both heads read, (B, N tokens, gh, gw) (diagnostics)."""
        fmap = self.encoder(self.to_released_input(images))
        return {t: fmap for t in self.tasks}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": (B, K), "seg": (B, S, H, W)}`` at the input resolution."""
        fmap = self.encoder(self.to_released_input(images))
        seg = F.interpolate(self.decoders["segmentation"](fmap), size=tuple(images.shape[-2:]), mode="bilinear",
                            align_corners=True)
        return {"cls": self.decoders["classification"](fmap), "seg": seg}

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """``{component: {"total": n, "trainable": n}}``: backbone, lora (A, B, U, V), sma, sma_unused_transformer,
        head.cls, head.seg, and ``"total"``."""
        rows: dict[str, dict[str, int]] = {}
        for name, p in self.named_parameters():
            r = rows.setdefault(_component(name), {"total": 0, "trainable": 0})
            r["total"] += p.numel()
            r["trainable"] += p.numel() if p.requires_grad else 0
        order = ("backbone", "lora", "sma", "sma_unused_transformer", "head.cls", "head.seg")
        out = {k: rows[k] for k in order if k in rows}
        out["total"] = {"total": sum(r["total"] for r in rows.values()),
                        "trainable": sum(r["trainable"] for r in rows.values())}
        return out


def _component(name: str) -> str:
    if name.startswith("decoders."):
        return "head.seg" if name.startswith("decoders.segmentation.") else "head.cls"
    if name.startswith("encoder.encoder.mob.trans."):
        return "sma_unused_transformer"
    if name.startswith("encoder.encoder.mob."):
        return "sma"
    if ".lora_" in name:
        return "lora"
    return "backbone"


# ---------------------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------------------

def _task_sizes(dataset: str | None, num_activities: int | None, num_seg_classes: int | None) -> tuple:
    if dataset is None:
        return num_activities, num_seg_classes

    spec = get_spec(dataset)
    for label, given, expected in (("num_activities", num_activities, spec.num_activities),
                                   ("num_seg_classes", num_seg_classes, spec.num_seg_classes)):
        if given is not None and given != expected:
            raise ValueError(f"{label}={given} contradicts dataset={dataset!r} ({expected})")
    return spec.num_activities, spec.num_seg_classes


def _config(num_activities, num_seg_classes, options: dict) -> ReleasedConfig:
    valid = {f.name for f in fields(ReleasedConfig)} - {"num_activities", "num_seg_classes"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown released-model option(s) {unknown}; valid options: {sorted(valid)}")
    if num_activities is None or num_seg_classes is None:
        raise ValueError("the number of activities and of segmentation classes are needed: pass dataset='mtlesd' "
                         "| 'mtlendovis' or num_activities= and num_seg_classes=")
    return ReleasedConfig(num_activities=num_activities, num_seg_classes=num_seg_classes, **options)


def build_released_model(dataset: str | None = None, num_activities: int | None = None,
                         num_seg_classes: int | None = None, *, input_normalisation: str = "imagenet",
                         **options) -> ReleasedModel:
    """The released architecture with random weights (``options``: :class:`ReleasedConfig` fields, e.g. test sizes).

    ``dataset`` ('mtlesd': K=3, S=7; 'mtlendovis': K=12, S=8; any registered name) or ``num_activities`` and
    ``num_seg_classes`` give the head sizes. Random init at the released ViT-B size warns
    (:class:`RandomInitWarning`): its results say nothing about the authors' model.
    """
    k, s = _task_sizes(dataset, num_activities, num_seg_classes)
    cfg = _config(k, s, options)
    model = ReleasedModel(cfg, input_normalisation)
    if cfg.embed_dim == 768 and cfg.depth == 12:
        warnings.warn("released EndoARSS model built with RANDOM weights: results mean nothing about the authors' "
                      "model; load their checkpoint with load_released_checkpoint(path)", RandomInitWarning,
                      stacklevel=2)
    return model


def read_released_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; returns (state dict, notes on unwrapping).

    Unwraps a dict holding the state dict under ``state_dict`` / ``model`` / ``model_state_dict`` / ``net`` and a
    DistributedDataParallel ``module.`` prefix. :class:`WeightsError` (naming the file) when the file is not a
    readable torch file (truncated, corrupt), holds pickled objects other than tensors and containers, or is not a
    flat ``{name: tensor}`` mapping; FileNotFoundError when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released checkpoint not found: {path} (the authors' files are "
                                f"{sorted(RELEASED_CHECKPOINTS.values())}, about 387 MB each)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a text file, random bytes, a truncated zip, pickled objects, ...
        raise WeightsError(
            f"{path}: cannot be read as a released EndoARSS checkpoint: {why_unreadable(path, exc)} "
            f"({path.stat().st_size} bytes; the authors' files are plain state dicts of about 387 MB: "
            f"{sorted(RELEASED_CHECKPOINTS.values())}). Download the file again and compare its sha256; a file that "
            f"holds pickled objects is never unpickled here, because unpickling runs code") from None
    notes: list[str] = []
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
        notes.append(f"unwrapped {key!r}")
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a state dict {{name: tensor}}, found "
                           f"{'an empty mapping' if isinstance(obj, Mapping) else type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: not a state dict of tensors: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} "
                           f"are not tensors: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("stripped the DataParallel 'module.' prefix")
    return sd, notes


def _all_tensors(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def released_task_sizes(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> tuple[int, int]:
    """(K activities, S segmentation classes) read from the heads' last layers of a released state dict."""
    missing = [k for k in (_CLS_LAST, _SEG_LAST) if k not in state_dict]
    if missing:
        raise WeightsError(f"{source}: no released head weights {missing}; expected the authors' LibMTL layout "
                           f"(keys encoder.encoder.* and decoders.segmentation.* / decoders.classification.*). "
                           f"Found keys like {sorted(state_dict)[:5]}")
    cls, seg = state_dict[_CLS_LAST], state_dict[_SEG_LAST]
    if cls.ndim != 2 or seg.ndim != 4:
        raise WeightsError(f"{source}: {_CLS_LAST} has shape {tuple(cls.shape)} (expected (K, 256)) and {_SEG_LAST} "
                           f"{tuple(seg.shape)} (expected (S, 256, 1, 1))")
    return int(cls.shape[0]), int(seg.shape[0])


def _fmt(items: list[str], limit: int = 20) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_strict(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if not (missing or unexpected or shapes):
        return
    lines = [f"strict loading of the released EndoARSS model from {source} failed:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_fmt(shapes)}")
    lines.append("  Expected the authors' MOLA + dinonet state dict (DINOv2-code ViT-B/14 at img_size 518 with DV-LoRA "
                 "on mlp.fc1/fc2, the SMA 'mob' incl. its unused transformer, DeepLab heads). A file of another size "
                 "needs the matching options (depth=, embed_dim=, internal_size=, ...); any other file is not a "
                 "released EndoARSS checkpoint.")
    raise WeightsError("\n".join(lines))


def load_released_checkpoint(path: str | os.PathLike, dataset: str | None = None,
                             num_activities: int | None = None, num_seg_classes: int | None = None, *,
                             input_normalisation: str = "imagenet", device: str | torch.device = "cpu",
                             **options) -> ReleasedModel:
    """Load an authors' released checkpoint into :class:`ReleasedModel` with strict keys and shapes; eval mode.

    ``dataset`` / ``num_activities`` / ``num_seg_classes``, when given, must agree with the head shapes in the file
    (K and S are read from the file otherwise). ``options`` override :class:`ReleasedConfig` fields (test sizes
    only; the defaults are the released architecture). The model records ``weights = {"source": path, "sha256":
    ...}``, ``pretrained_random_init = False`` and ``checkpoint_notes`` (what was unwrapped). ``input_normalisation``:
    see :class:`ReleasedModel` (default ``"imagenet"``: feed ``MTLDataset`` tensors).
    """
    sd, notes = read_released_state_dict(path)
    source = str(path)
    k_file, s_file = released_task_sizes(sd, source)
    expected = _task_sizes(dataset, num_activities, num_seg_classes)
    for label, want, got in (("activities (K)", expected[0], k_file),
                             ("segmentation classes (S)", expected[1], s_file)):
        if want is not None and want != got:
            what = f"dataset {dataset!r}" if dataset is not None else "the caller"
            raise WeightsError(f"{source}: the file's heads have {got} {label}, {what} expects {want}. The MTLESD "
                               f"checkpoint has K=3, S=7; the MTLEndovis one K=12, S=8 ({RELEASED_CHECKPOINTS}).")
    cfg = _config(k_file, s_file, options)
    with torch.device("meta"):
        model = ReleasedModel(cfg, input_normalisation)
    own = model.state_dict()
    _check_strict(own, sd, source)
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.freeze_as_released()
    model.weights = {"source": source, "sha256": file_sha256(path)}
    model.pretrained_random_init = False
    model.checkpoint_notes = notes
    return model.to(device).eval()
