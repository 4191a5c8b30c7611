"""Task heads in the DeepLab-V3 style (Chen et al., 2017): ASPP segmentation head and a conv + pool classifier.

Atrous rates: DeepLab-V3's 6/12/18 (12/24/36 at output stride 8) were chosen for 33x33 (65x65) feature maps. A
DINOv2 ViT/14 at 224 px gives a 16x16 map, where rate 12 or more puts all eight outer taps of every 3x3 kernel in the
zero padding, so those branches collapse to 1x1 convolutions. See :func:`default_aspp_rates`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["default_aspp_rates", "ConvBNReLU", "ASPP", "DetailStem", "SegmentationHead", "ClassificationHead"]


def default_aspp_rates(feature_size: int) -> tuple[int, int, int]:
    """Atrous rates (r, 2r, 3r) with r = max(1, (feature_size - 1) // 6), each clamped to [1, feature_size - 1].

    Why: keep DeepLab's 1:2:3 ratio, and make the largest rate at most (feature_size - 1) / 2 so that a 3x3 kernel
    centred in the map still has all nine taps inside it (the branch sees context, not padding). This gives
    16 -> (2, 4, 6), 32 -> (5, 10, 15), 33 -> (5, 10, 15) (DeepLab: 6/12/18), 8 -> (1, 2, 3), 4 -> (1, 2, 3).
    For feature_size < 7 the smallest ratio-keeping triple (1, 2, 3) already exceeds that bound (unavoidable).
    Strictly increasing for feature_size >= 4; below that three distinct useful rates do not exist and the clamp
    gives repeats (3 -> (1, 2, 2), 2 or 1 -> (1, 1, 1)).
    """
    if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 1:
        raise ValueError(f"feature_size must be a positive int, got {feature_size!r}")
    r = max(1, (feature_size - 1) // 6)
    hi = max(1, feature_size - 1)
    return tuple(min(k * r, hi) for k in (1, 2, 3))  # type: ignore[return-value]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias, BN follows) -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        pad = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _ASPPPooling(nn.Module):
    """Image-pooling branch: GAP -> 1x1 conv (with bias) -> ReLU -> upsample.

    No BatchNorm here (DeepLab has one): on a 1x1 map with batch 1 it has a single value per channel and fails in
    training. The projection's BatchNorm after the concat normalises this branch with the others.
    """

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])  # bilinear upsampling of a 1x1 map is a broadcast


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: 1x1 + three 3x3 atrous + image pooling, concat, 1x1 -> BN -> ReLU -> dropout."""

    def __init__(self, in_channels: int, channels: int = 256, rates: Sequence[int] = (2, 4, 6), dropout: float = 0.5):
        super().__init__()
        rates = tuple(rates)
        if len(rates) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"rates must be three positive ints, got {rates!r}")
        self.rates = rates
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, channels, 1)] + [ConvBNReLU(in_channels, channels, 3, dilation=r) for r in rates]
        )
        self.pool = _ASPPPooling(in_channels, channels)
        self.project = ConvBNReLU(5 * channels, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.branches] + [self.pool(x)], dim=1)
        return self.drop(self.project(y))


def _check_features(features: torch.Tensor, in_channels: int) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a 4-D tensor (B, C, h, w), got {shape}")
    if features.shape[1] != in_channels:
        raise ValueError(f"features has {features.shape[1]} channels, head built with in_channels={in_channels}")


def _check_positive(**kwargs: int) -> None:
    for name, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class DetailStem(nn.Sequential):
    """The image at output stride 4 for the decoder: two stride-2 3x3 conv-BN-ReLU (3 -> channels / 2 -> channels)."""

    def __init__(self, channels: int):
        half = max(channels // 2, 1)
        super().__init__(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )


class SegmentationHead(nn.Module):
    """DeepLab-V3 head: ASPP -> 3x3 conv-BN-ReLU -> 1x1 to num_classes -> bilinear upsampling to out_size.

    ``detail_channels > 0`` adds a DeepLab-V3+ style decoder (Chen et al., ECCV 2018) whose low-level features come
    from the image itself, since a ViT has no stride-4 stage: a small trainable stem (:class:`DetailStem`) gives the
    image at output stride 4; the ASPP output, reduced to ``decoder_channels`` by a 1x1 conv-BN-ReLU, is upsampled to
    that size, concatenated with it, and a 3x3 conv-BN-ReLU and the 1x1 classifier work there. Objects smaller than
    a patch (14 px), which a 16 x 16 token grid cannot place, can then be drawn. ``forward`` needs ``image=``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: Sequence[int] | None = None,
        feature_size: int = 16,
        dropout: float = 0.5,
        detail_channels: int = 0,
        decoder_channels: int = 48,
    ):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, channels=channels)
        if isinstance(detail_channels, bool) or not isinstance(detail_channels, int) or detail_channels < 0:
            raise ValueError(f"detail_channels must be an int >= 0, got {detail_channels!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.detail_channels = detail_channels
        self.aspp = ASPP(in_channels, channels, default_aspp_rates(feature_size) if rates is None else rates, dropout)
        self.conv = ConvBNReLU(channels, channels, 3)
        if detail_channels:
            _check_positive(decoder_channels=decoder_channels)
            self.stem = DetailStem(detail_channels)
            self.reduce = ConvBNReLU(channels, decoder_channels, 1)
            self.fuse = ConvBNReLU(decoder_channels + detail_channels, decoder_channels, 3)
            self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        else:
            self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor, out_size: tuple[int, int], image: torch.Tensor | None = None
                ) -> torch.Tensor:
        _check_features(features, self.in_channels)
        if len(out_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out_size):
            raise ValueError(f"out_size must be two positive ints (H, W), got {out_size!r}")
        y = self.conv(self.aspp(features))
        if self.detail_channels:
            if image is None:
                raise ValueError("image is required: the head was built with detail_channels > 0")
            detail = self.stem(image)
            y = F.interpolate(self.reduce(y), size=detail.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse(torch.cat([y, detail], dim=1))
        logits = self.classifier(y)
        return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)


class ClassificationHead(nn.Module):
    """3x3 conv-BN-ReLU -> global average pool -> [concat class token] -> dropout -> linear to num_classes."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        token_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, channels=channels)
        if token_dim is not None:
            _check_positive(token_dim=token_dim)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.token_dim = token_dim
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels + (token_dim or 0), num_classes)

    def forward(self, features: torch.Tensor, cls_token: torch.Tensor | None = None) -> torch.Tensor:
        _check_features(features, self.in_channels)
        y = self.conv(features).mean(dim=(2, 3))
        if self.token_dim is None:
            if cls_token is not None:
                raise ValueError("cls_token given but the head was built with token_dim=None")
        else:
            if cls_token is None:
                raise ValueError(f"cls_token (B, {self.token_dim}) is required: head built with token_dim")
            if cls_token.shape != (features.shape[0], self.token_dim):
                raise ValueError(
                    f"cls_token must be (B={features.shape[0]}, token_dim={self.token_dim}), "
                    f"got {tuple(cls_token.shape)}"
                )
            y = torch.cat([y, cls_token], dim=1)
        return self.fc(self.drop(y))
