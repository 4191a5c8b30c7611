"""Spatially-aware Multi-scale Attention (SMA, EndoARSS paper Sec. III-B, Fig. 3a) and its EMA core.

SMA runs on the image before the ViT patch embedding (3 channels in, 3 out):

    x -> nxn conv (C->C) -> 1x1 conv (C->dim) -> unfold into PxN (P = patch_size**2 positions inside a patch,
    N = HW/P patches) -> EMA treating P as channels and the N x dim grid as 'spatial' -> fold back ->
    1x1 conv (dim->C) -> concat with x (2C) -> nxn fusion conv (2C->C)

The unfold / fold follows MobileViT (Mehta & Rastegari, ICLR 2022), the attention is EMA (Ouyang et al., ICASSP 2023).

Two implementations of the same function, with the same parameters (state dicts are interchangeable):

* ``impl="fused"`` (default): :mod:`.sma_fused` -- the dim-wide part as one autograd function that works on chunks
  of patches and never materialises a dim-wide tensor (nor EMA's 3x3 convolution over all channels, which it
  reduces algebraically to a single-output one); a hand-written backward. Memory: a few MiB per image besides the
  chunk buffers; not twice differentiable.
* ``impl="reference"``: the modules as written in the paper -- ``proj_in``, :func:`patchify`, :class:`EMA`,
  :func:`unpatchify`, ``proj_out``. The unfolded tensor has dim * H * W elements, i.e. at dim=512 it is 25.7 M floats
  (about 100 MB fp32) per 224x224 image, and EMA keeps several tensors of that size alive for backward (measured:
  about 590 MiB of saved activations per image). With groups=1 EMA's 3x3 conv (49 -> 49 channels over a 1024 x 512
  grid) dominates: 23.1 GFLOPs per image (3.7 with groups=7).

``checkpoint=True`` recomputes the dim-wide part in backward so only the C-channel input is stored (both
implementations; it matters for the reference one).

Deviations from the paper / released code (documented): plain convolutions with bias (the paper names no norm or
activation); ``residual=True`` adds the input back through a zero-initialised fusion conv so SMA is the identity at
initialisation and a pretrained patch embedding sees the real image at the start of training.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .sma_fused import DEFAULT_CHUNK_ELEMENTS, from_patch_rows, fused_global, to_patch_rows

__all__ = ["EMA", "SMA", "patchify", "unpatchify", "SMA_IMPLS"]

SMA_IMPLS = ("fused", "reference")


class EMA(nn.Module):
    """Efficient Multi-scale Attention (Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial
    Learning", ICASSP 2023, arXiv:2305.13563): (B, C, H, W) -> (B, C, H, W).

    Channels are split into ``groups`` groups that share all weights (the groups are folded into the batch, as in the
    original). Per group x (c = C/groups channels):
    x1 = GroupNorm(x * sig(conv1x1(pool_w x)) * sig(conv1x1(pool_h x))), x2 = conv3x3(x),
    w = softmax(GAP(x1)) @ x2 + softmax(GAP(x2)) @ x1  (one H x W map), out = x * sig(w).
    """

    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if groups < 1 or channels % groups:
            raise ValueError(f"groups={groups} must be >= 1 and divide channels={channels}")
        self.channels = channels
        self.groups = groups
        cg = channels // groups
        self.conv1x1 = nn.Conv2d(cg, cg, kernel_size=1)
        self.conv3x3 = nn.Conv2d(cg, cg, kernel_size=3, padding=1)
        # num_groups == num_channels: per-channel normalisation over the spatial grid, as in the original EMA.
        self.gn = nn.GroupNorm(cg, cg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        gx = x.reshape(b * self.groups, c // self.groups, h, w)
        x_h = gx.mean(dim=3, keepdim=True)  # (bg, cg, h, 1): pooled over width
        x_w = gx.mean(dim=2, keepdim=True).transpose(2, 3)  # (bg, cg, w, 1): pooled over height
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))  # one shared 1x1 conv for both directions
        a_h, a_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(gx * a_h.sigmoid() * a_w.transpose(2, 3).sigmoid())
        x2 = self.conv3x3(gx)
        # Cross-spatial learning: channel-softmaxed global descriptor of one branch weights the other's pixels.
        d1 = x1.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)  # (bg, 1, cg)
        d2 = x2.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)
        weights = torch.matmul(d1, x2.flatten(2)) + torch.matmul(d2, x1.flatten(2))  # (bg, 1, h*w)
        return (gx * weights.reshape(b * self.groups, 1, h, w).sigmoid()).reshape(b, c, h, w)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Unfold (B, d, H, W) into non-overlapping patches (B, P = patch_size**2, N = HW / P, d); N is row-major."""
    b, d, h, w = x.shape
    p = patch_size
    nh, nw = h // p, w // p
    x = x.reshape(b, d, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1)  # (b, ph, pw, nh, nw, d)
    return x.reshape(b, p * p, nh * nw, d)


def unpatchify(x: torch.Tensor, size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Fold (B, P, N, d) back to (B, d, H, W); exact inverse of :func:`patchify`."""
    b, _, _, d = x.shape
    h, w = size
    p = patch_size
    nh, nw = h // p, w // p
    x = x.reshape(b, p, p, nh, nw, d).permute(0, 5, 3, 1, 4, 2)  # (b, d, nh, ph, nw, pw)
    return x.reshape(b, d, h, w)


class SMA(nn.Module):
    """Spatially-aware Multi-scale Attention: (B, in_chans, H, W) -> same shape; H, W divisible by patch_size.

    ``impl``: ``"fused"`` (default, memory-light) or ``"reference"`` (the paper's modules), see the module
    docstring; same parameters and state dict. ``chunk_elements``: elements of one chunk of the dim-wide tensor in
    the fused implementation (default 2**18; smaller = less memory, more Python overhead). Both can be changed on
    an existing module (attributes ``impl``, ``chunk_elements``).
    """

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 512,
        patch_size: int = 7,
        groups: int = 1,
        kernel_size: int = 3,
        residual: bool = False,
        checkpoint: bool = False,
        impl: str = "fused",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        super().__init__()
        if impl not in SMA_IMPLS:
            raise ValueError(f"impl must be one of {SMA_IMPLS}, got {impl!r}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        for name, v in (("in_chans", in_chans), ("dim", dim), ("patch_size", patch_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (size-preserving padding), got {kernel_size}")
        self.in_chans = in_chans
        self.dim = dim
        self.patch_size = patch_size
        self.residual = residual
        self.checkpoint = checkpoint
        self.impl = impl
        self.chunk_elements = int(chunk_elements)
        pad = kernel_size // 2
        self.local = nn.Conv2d(in_chans, in_chans, kernel_size, padding=pad)
        self.proj_in = nn.Conv2d(in_chans, dim, 1)
        self.ema = EMA(patch_size * patch_size, groups)
        self.proj_out = nn.Conv2d(dim, in_chans, 1)
        self.fusion = nn.Conv2d(2 * in_chans, in_chans, kernel_size, padding=pad)
        if residual:
            # Identity at init: a pretrained patch embedding first sees the real image (deviation from the paper).
            nn.init.zeros_(self.fusion.weight)
            nn.init.zeros_(self.fusion.bias)

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        # The heavy part (dim-wide tensors); checkpointed as one unit so backward stores only x.
        if self.impl == "fused":
            return self._global_fused(x)
        y = self.proj_in(self.local(x))
        y = self.ema(patchify(y, self.patch_size))
        y = unpatchify(y, (x.shape[2], x.shape[3]), self.patch_size)
        return self.proj_out(y)

    def _global_fused(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        rows = fused_global(to_patch_rows(y, self.patch_size), self.proj_in, self.ema, self.proj_out,
                            self.chunk_elements)
        return from_patch_rows(rows, (x.shape[2], x.shape[3]), self.patch_size).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be (B, in_chans={self.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} must be divisible by patch_size={self.patch_size}")
        if self.checkpoint and self.training and torch.is_grad_enabled():
            y = _checkpoint(self._global, x, use_reentrant=False)
        else:
            y = self._global(x)
        out = self.fusion(torch.cat([x, y], dim=1))
        return x + out if self.residual else out

    def extra_repr(self) -> str:
        return f"residual={self.residual}, checkpoint={self.checkpoint}, impl={self.impl!r}"
