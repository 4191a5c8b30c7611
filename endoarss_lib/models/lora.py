"""LoRA (paper Eq. 2-3) and grouped low-rank adapters (TESLA, Eq. 5-6; MoE experts) around frozen linear layers.

One module, :class:`LoRALinear`, wraps an ``nn.Linear`` (or a 1x1 ``nn.Conv2d``, :class:`LoRAConv1x1`) and adds

* a **shared LoRA** ``h = W0 x + (alpha / r) B A x`` (A Kaiming-uniform, B zeros), applied only to chosen equal-size
  row chunks of the output: for timm's fused ``qkv`` (3 chunks) the q and v chunks (k untouched, paper Eq. 3);
* optionally ``G`` **group adapters** ``(A_g, B_g)`` used for a task-major concatenated batch ``(G * B, ..., Cin)``:
  rows of group ``g`` get ``(scale_g) B_g A_g x``. The frozen matmul and the shared LoRA run once over the whole
  batch; the group update is one batched matmul (``torch.bmm`` over the G groups), never a Python loop over groups.
  TESLA uses one adapter per task (``kind="tesla"``), MMoE / DSelect-k one per expert (``kind="expert"``).
* ``soft=True`` (TESLA option): ``E`` adapters shared by all groups, mixed per group with learnable weights
  ``softmax(alpha_g)`` (paper Eq. 5 with a soft alpha); the default one-hot alpha (``soft=False``) routes group g to
  adapter g only, so adapter g gets gradients from group g's loss only (explicit gradient separation).

Every group adapter's ``B`` starts at zero, so at initialisation the module equals the LoRA-only (shared) layer.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "LoRAConv1x1", "QKV_CHUNKS", "lora_modules", "route_to_group", "merge_lora", "unmerge_lora",
           "fold_lora"]

QKV_CHUNKS = {"q": 0, "k": 1, "v": 2}


def _kaiming_(t: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform init of a (..., r, Cin) factor as nn.Linear does (a = sqrt(5))."""
    for m in t.view(-1, t.shape[-2], t.shape[-1]):
        nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return t


class LoRALinear(nn.Module):
    """``base(x)`` + shared LoRA on chosen output chunks + optional per-group (task / expert) low-rank adapters."""

    def __init__(
        self,
        base: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        chunks: int = 1,
        adapt: Sequence[int] | None = None,
        num_groups: int = 0,
        group_rank: int | None = None,
        group_alpha: float | None = None,
        kind: str = "tesla",
        soft: bool = False,
        num_adapters: int | None = None,
    ):
        super().__init__()
        cin, cout = self._features(base)
        if cout % chunks:
            raise ValueError(f"out_features={cout} not divisible into chunks={chunks}")
        adapt = tuple(range(chunks)) if adapt is None else tuple(sorted(set(adapt)))
        if not adapt or any(not 0 <= a < chunks for a in adapt):
            raise ValueError(f"adapt={adapt} must name chunks in [0, {chunks})")
        if rank < 0 or num_groups < 0:
            raise ValueError(f"rank={rank} and num_groups={num_groups} must be >= 0")
        if kind not in ("tesla", "expert"):
            raise ValueError(f"kind must be 'tesla' or 'expert', got {kind!r}")
        self.base = base
        self.in_features, self.out_features = cin, cout
        self.chunks, self.adapt = chunks, adapt
        self.chunk_size = cout // chunks
        s, cs = len(adapt), self.chunk_size
        self.register_buffer("_adapt_index", torch.tensor(adapt, dtype=torch.long), persistent=False)
        # Shared LoRA (paper Eq. 2-3): A (S, r, Cin) Kaiming-uniform, B (S, Cs, r) zeros.
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank if rank else 0.0
        if rank:
            self.lora_A = nn.Parameter(_kaiming_(torch.empty(s, rank, cin)))
            self.lora_B = nn.Parameter(torch.zeros(s, cs, rank))
        # Group adapters (TESLA Eq. 5-6 or MoE experts): one (A_g, B_g) per adapter, stacked in forward.
        self.kind = kind
        self.num_groups = num_groups
        self.soft = bool(soft) and num_groups > 0
        self.num_adapters = (num_adapters or num_groups) if num_groups else 0
        if num_groups and not self.soft and self.num_adapters != num_groups:
            raise ValueError(f"one-hot routing needs num_adapters == num_groups, got {self.num_adapters} != "
                             f"{num_groups}")
        if num_groups and not (group_rank or rank):
            raise ValueError("group adapters need a rank: give group_rank (or a shared rank > 0)")
        self.group_rank = (group_rank or rank) if num_groups else 0
        self.group_scale = ((group_alpha or self.group_rank) / self.group_rank) if num_groups else 0.0
        if num_groups:
            r = self.group_rank
            setattr(self, f"{kind}_A", nn.ParameterList(
                [nn.Parameter(_kaiming_(torch.empty(s, r, cin))) for _ in range(self.num_adapters)]))
            setattr(self, f"{kind}_B", nn.ParameterList(
                [nn.Parameter(torch.zeros(s, cs, r)) for _ in range(self.num_adapters)]))
            if self.soft:  # per-group mixing logits over the E adapters; zeros = uniform mixture at start
                setattr(self, f"{kind}_alpha", nn.ParameterList(
                    [nn.Parameter(torch.zeros(self.num_adapters)) for _ in range(num_groups)]))
        self.merged = False
        self.forced_group: int | None = None  # set by route_to_group: whole batch uses one group's adapter

    @staticmethod
    def _features(base: nn.Module) -> tuple[int, int]:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        return base.in_features, base.out_features

    # -- adapters --------------------------------------------------------------------------------------------------
    def group_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked group adapters: A (E, S, r, Cin), B (E, S, Cs, r)."""
        return (torch.stack(list(getattr(self, f"{self.kind}_A"))),
                torch.stack(list(getattr(self, f"{self.kind}_B"))))

    def mixing_weights(self) -> torch.Tensor:
        """Per-group weights over adapters (G, E): one-hot identity, or softmax of the learnable logits."""
        if self.soft:
            return torch.stack([F.softmax(a, dim=0) for a in getattr(self, f"{self.kind}_alpha")])
        a, _ = self.group_factors()
        return torch.eye(self.num_groups, dtype=a.dtype, device=a.device)

    @staticmethod
    def _lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> list[torch.Tensor]:
        """Per adapted chunk j: scale * B_j A_j x, each (..., Cs); a (S, r, Cin), b (S, Cs, r)."""
        s, r, cin = a.shape
        u = F.linear(x, a.reshape(s * r, cin)) * scale  # (..., S*r): scaling the small tensor
        return [F.linear(u[..., j * r:(j + 1) * r], b[j]) for j in range(s)]

    @staticmethod
    def _lowrank_mixed(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
                       scale: float) -> list[torch.Tensor]:
        """sum_e w_e B_e A_e x per chunk; a (E, S, r, Cin), b (E, S, Cs, r), w broadcastable to (..., E, 1, 1)."""
        e, s, r, cin = a.shape
        u = F.linear(x, a.reshape(e * s * r, cin)).unflatten(-1, (e, s, r)) * (w * scale)
        return [F.linear(u[..., j, :].flatten(-2), b[:, j].permute(1, 0, 2).reshape(-1, e * r)) for j in range(s)]

    def _group_deltas(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x (N, ..., Cin), N = G * B task-major (any N when forced_group is set) -> per chunk (N, ..., Cs)
        a, b = self.group_factors()
        if self.forced_group is not None:
            g = self.forced_group
            if self.soft:
                return self._lowrank_mixed(x, a, b, self.mixing_weights()[g][:, None, None], self.group_scale)
            return self._lowrank(x, a[g], b[g], self.group_scale)
        n, gn = x.shape[0], self.num_groups
        if n % gn:
            raise ValueError(f"batch {n} is not a multiple of num_groups={gn} (task-major concatenation)")
        xg = x.reshape(gn, -1, self.in_features)  # (G, M, Cin), M = B * tokens
        if self.soft:  # E adapters shared by all groups, mixed per group
            w = self.mixing_weights()[:, None, :, None, None]  # (G, 1, E, 1, 1)
            ds = self._lowrank_mixed(xg, a, b, w, self.group_scale)
        else:  # one-hot: group g through adapter g, all groups in one batched matmul per factor
            s, r = len(self.adapt), self.group_rank
            u = torch.bmm(xg, a.reshape(gn, s * r, self.in_features).transpose(1, 2)) * self.group_scale
            ds = [torch.bmm(u[..., j * r:(j + 1) * r], b[:, j].transpose(1, 2)) for j in range(s)]
        return [d.reshape(*x.shape[:-1], self.chunk_size) for d in ds]

    def chunk_deltas(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Low-rank updates, one (..., Cs) per adapted chunk (shared + group), or None when there is nothing to add."""
        ds = None
        if self.rank and not self.merged:
            ds = self._lowrank(x, self.lora_A, self.lora_B, self.scale)
        if self.num_groups:
            gds = self._group_deltas(x)
            ds = gds if ds is None else [d + g for d, g in zip(ds, gds)]
        return ds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ds = self.chunk_deltas(x)
        if ds is None:
            return out
        # In place into the fresh matmul output (its backward does not need it): no copy of the qkv tensor.
        o = out.view(*out.shape[:-1], self.chunks, self.chunk_size)
        for c, d in zip(self.adapt, ds):
            o[..., c, :] += d
        return out

    # -- merge -----------------------------------------------------------------------------------------------------
    def _shared_weight_delta(self) -> torch.Tensor:
        return torch.einsum("sor,src->soc", self.lora_B, self.lora_A) * self.scale  # (S, Cs, Cin)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the shared LoRA ``(alpha/r) B A`` into the frozen weight (group adapters stay separate).

        The merged state is not part of the state dict: save checkpoints unmerged.
        """
        if self.rank and not self.merged:
            w = self.base.weight.view(self.chunks, self.chunk_size, -1)
            w.index_add_(0, self._adapt_index, self._shared_weight_delta().to(w.dtype).reshape(
                len(self.adapt), self.chunk_size, -1))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (restores W0 up to floating-point rounding)."""
        if self.rank and self.merged:
            w = self.base.weight.view(self.chunks, self.chunk_size, -1)
            w.index_add_(0, self._adapt_index, -self._shared_weight_delta().to(w.dtype).reshape(
                len(self.adapt), self.chunk_size, -1))
            self.merged = False

    def extra_repr(self) -> str:
        s = (f"in={self.in_features}, out={self.out_features}, chunks={self.chunks}, adapt={self.adapt}, "
             f"rank={self.rank}")
        if self.num_groups:
            s += (f", {self.kind}: groups={self.num_groups}, adapters={self.num_adapters}, rank={self.group_rank}"
                  f", {'soft' if self.soft else 'one-hot'}")
        return s


class LoRAConv1x1(LoRALinear):
    """:class:`LoRALinear` around a 1x1, stride-1 ``nn.Conv2d`` (channels are the features); used for ResNet TESLA."""

    @staticmethod
    def _features(base: nn.Module) -> tuple[int, int]:
        if not (isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.stride == (1, 1)
                and base.groups == 1):
            raise TypeError(f"LoRAConv1x1 wraps a 1x1 stride-1 ungrouped nn.Conv2d, got {base}")
        return base.in_channels, base.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ds = self.chunk_deltas(x.permute(0, 2, 3, 1))  # per chunk (N, H, W, Cs)
        if ds is None:
            return out
        for c, d in zip(self.adapt, ds):
            out[:, c * self.chunk_size:(c + 1) * self.chunk_size] += d.permute(0, 3, 1, 2)
        return out

    def merge(self) -> None:  # the base conv of a ResNet is trainable: nothing to fold
        """No-op (only group adapters, which cannot be folded into one weight)."""

    def unmerge(self) -> None:
        """No-op."""


def lora_modules(module: nn.Module) -> Iterator[LoRALinear]:
    """All LoRA wrappers inside ``module``."""
    return (m for m in module.modules() if isinstance(m, LoRALinear))


@contextmanager
def override_attribute(module: nn.Module, name: str, value):
    """Inside the context every submodule that has attribute ``name`` has it set to ``value``; restored after."""
    mods = [m for m in module.modules() if hasattr(m, name)]
    old = [getattr(m, name) for m in mods]
    for m in mods:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            setattr(m, name, o)


def route_to_group(module: nn.Module, group: int | None):
    """Inside the context every group-aware layer (LoRA, grouped BN) uses group ``group`` for the whole batch."""
    return override_attribute(module, "forced_group", group)


def merge_lora(module: nn.Module) -> None:
    """Fold every shared LoRA inside ``module`` into its frozen weight."""
    for m in lora_modules(module):
        m.merge()


def unmerge_lora(module: nn.Module) -> None:
    """Undo :func:`merge_lora`."""
    for m in lora_modules(module):
        m.unmerge()


def fold_lora(module: nn.Module) -> int:
    """For inference and export, in place: fold every shared LoRA into its frozen weight (``W0 + (alpha / r) B A``
    on the adapted chunks, :meth:`LoRALinear.merge`) and replace each wrapper that has nothing left to add (no group
    adapters) by its plain base layer, so the module holds ordinary ``nn.Linear`` / ``nn.Conv2d`` layers there.
    Wrappers with group (TESLA / expert) adapters stay, merged. Not reversible: call it on a copy. Returns the
    number of wrappers replaced."""
    merge_lora(module)
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear) and not child.num_groups and (child.merged or not child.rank):
                setattr(parent, name, child.base)
                replaced += 1
    return replaced
