"""Gates for the mixture-of-experts architectures: MMoE softmax gate and DSelect-k (Hazimeh et al., NeurIPS 2021).

Both read a compact descriptor of the input (:func:`image_descriptor`: the image average-pooled to p x p, 3 p^2
numbers), not the raw pixels (the released code fed 178 608 raw pixels to a linear gate).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["image_descriptor", "SoftmaxGate", "DSelectKGate", "smooth_step"]


def image_descriptor(images: torch.Tensor, pool: int = 8) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3 * pool * pool): the image average-pooled to pool x pool."""
    return F.adaptive_avg_pool2d(images, pool).flatten(1)


class SoftmaxGate(nn.Module):
    """MMoE gate: softmax(W d + b) over E experts."""

    def __init__(self, in_features: int, num_experts: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.softmax(self.linear(d), dim=-1), None


def smooth_step(t: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Cubic smooth-step: 0 below -gamma/2, 1 above gamma/2, -2/g^3 t^3 + 3/(2g) t + 1/2 between (C^1)."""
    mid = (-2.0 / gamma**3) * t**3 + (3.0 / (2.0 * gamma)) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), mid))


class DSelectKGate(nn.Module):
    """Per-example DSelect-k gate: k binary-encoded selectors (m = ceil(log2 E) smooth-steps each), softmax-mixed.

    Returns the expert weights (B, E) and the selector outputs (B, k, E) whose entropy is the regulariser that
    pushes every selector to a single expert (:meth:`entropy`). For E not a power of two each selector's output is
    renormalised over the E valid codes (as in the authors' implementation; a selector saturated on an unused code
    gives a uniform distribution instead of 0/0).
    """

    def __init__(self, in_features: int, num_experts: int, k: int = 2, gamma: float = 1.0):
        super().__init__()
        if num_experts < 2 or k < 1:
            raise ValueError(f"DSelect-k needs num_experts >= 2 and k >= 1, got E={num_experts}, k={k}")
        self.num_experts, self.k, self.gamma = num_experts, k, gamma
        self.num_binary = max(1, math.ceil(math.log2(num_experts)))
        self.power_of_2 = num_experts == 2**self.num_binary
        self.z_logits = nn.Linear(in_features, k * self.num_binary)
        self.w_logits = nn.Linear(in_features, k)
        # Start inside the smooth region of the step (|z| << gamma/2), as the authors' initialiser does.
        nn.init.uniform_(self.z_logits.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.z_logits.bias, -gamma / 100, gamma / 100)
        # LibMTL's (and the authors' TensorFlow) selector-weight initialisation: U(-0.05, 0.05)
        nn.init.uniform_(self.w_logits.weight, -0.05, 0.05)
        nn.init.uniform_(self.w_logits.bias, -0.05, 0.05)
        codes = [[(e >> (self.num_binary - 1 - j)) & 1 for j in range(self.num_binary)] for e in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)  # (E, m)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = d.shape[0]
        s = smooth_step(self.z_logits(d).view(b, self.k, 1, self.num_binary), self.gamma)  # (B, k, 1, m)
        sel = torch.where(self.codes, s, 1 - s).prod(-1)  # (B, k, E)
        if not self.power_of_2:
            # eps: a selector saturated on an unused code (sum 0) falls back to uniform instead of NaN
            sel = (sel + 1e-8) / (sel.sum(-1, keepdim=True) + 1e-8 * self.num_experts)
        w = F.softmax(self.w_logits(d), dim=-1)  # (B, k)
        return torch.einsum("bk,bke->be", w, sel), sel

    @staticmethod
    def entropy(sel: torch.Tensor) -> torch.Tensor:
        """Sum over selectors of the entropy of their expert distribution, averaged over the batch."""
        return -(sel * torch.log(sel + 1e-6)).sum(-1).sum(-1).mean()
