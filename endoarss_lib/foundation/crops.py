"""DINO's multi-crop augmentation, batched: :class:`MultiCrop` (roi_align crops, batched colour jitter, blur,
solarisation), and the ImageNet normalisation the crops and the probes share (``_MEAN``, ``_STD``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .recipe import PretrainConfig

__all__ = ["MultiCrop"]

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
