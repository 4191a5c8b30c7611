"""Multi-task architectures (LibMTL's sense): how the tasks share the backbone.

* ``hps``: one shared encoder (frozen DINOv2 + shared LoRA, or a trainable ResNet), one head per task.
* ``tesla``: shared LoRA plus one low-rank adapter per task in every block (paper Eq. 5-6); one batched pass over the
  task-major concatenated batch gives one feature map per task.
* ``mmoe``: E experts (separate LoRA sets over the shared frozen ViT, or E ResNet copies), per-task softmax gates on a
  compact image descriptor mix the expert feature maps.
* ``dselect_k``: as ``mmoe`` with DSelect-k gates; :meth:`regularization_loss` returns the entropy regulariser.
* ``single``: ``hps`` with exactly one task.

Any of them can carry a **connector** between the backbone and the heads (``model.connector``; Uni-Med's CMoE,
:mod:`.connectors`), and ``token_map="released"`` reproduces the released code's token reshape (tokens become
channels; for the comparison notebook only).

Every model's ``forward(images)`` returns ``{task: logits}``; ``features(images)`` returns ``{task: (B, C, h, w)}``
(what the heads read: after the connector and the token map).
"""
from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..tasks import get_task
from .connectors import released_token_map, tokens_from_map
from .gates import DSelectKGate, SoftmaxGate, image_descriptor
from .lora import merge_lora, unmerge_lora
from .report import parameter_report

__all__ = ["MultiTaskModel", "HPSModel", "TESLAModel", "MMoEModel", "DSelectKModel", "ARCHITECTURES"]

_TESLA_ADAPTER = re.compile(r"\.tesla_[AB]\.(\d+)$")
_TESLA_ALPHA = re.compile(r"\.tesla_alpha\.(\d+)$")


@functools.lru_cache(maxsize=None)
def _takes_image(forward) -> bool:
    """Whether a task's ``forward_head`` accepts the input image (a fifth argument)."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(params) >= 5


class MultiTaskModel(nn.Module):
    """Backbone + one head per task; subclasses decide how task features come out of the backbone."""

    arch = "hps"

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], tasks: Sequence[str], config=None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.tasks = tuple(tasks)
        self.config = config
        self.connector: nn.Module | None = None  # e.g. CMoEConnector, set by build_model
        self.token_map = "spatial"  # "released": the released code's reshape (tokens become channels)
        self.released_grid: tuple[int, int] | None = None

    # -- forward ---------------------------------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        out = self.backbone(images)
        tok = None if out.tokens is None else out.tokens[0]
        return {t: (out.maps[0], tok) for t in self.tasks}

    def _post(self, feats: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
        """Connector, then the token map, on each task's (map, class token)."""
        if self.connector is not None:
            feats = self.connector(feats)
        if self.token_map == "released":
            feats = {t: (released_token_map(tokens_from_map(f), self.released_grid), tok)
                     for t, (f, tok) in feats.items()}
        return feats

    def _task_features(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return self._post(self._encode(images))

    def _head(self, task: str, fmap: torch.Tensor, tok: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s head on its features, called as the task registry says (:attr:`Task.forward_head`; the
        input images go to a forward function that takes them)."""
        forward = get_task(task).forward_head
        if _takes_image(forward):
            return forward(self.heads[task], fmap, tok, images.shape[-2:], images)
        return forward(self.heads[task], fmap, tok, images.shape[-2:])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: logits}`` for the tasks the model was built with (``{"cls": (B, K), "seg": (B, S, H, W)}``)."""
        feats = self._task_features(images)
        return {t: self._head(t, *feats[t], images) for t in self.tasks}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task feature maps (B, C, h, w) the heads read (diagnostics)."""
        return {t: f for t, (f, _) in self._task_features(images).items()}

    # -- hooks the training engine calls -------------------------------------------------------------------------
    def reset_epoch_stats(self) -> None:
        """Start an epoch's statistics (a connector's routing); called by the engine before each training epoch."""
        if self.connector is not None and hasattr(self.connector, "reset_epoch_stats"):
            self.connector.reset_epoch_stats()

    def epoch_stats(self) -> tuple[dict[str, float], list[dict]]:
        """(log columns, per-task rows for ``routing.csv``) of the epoch's training forwards; empty without a
        connector that keeps statistics."""
        if self.connector is not None and hasattr(self.connector, "epoch_stats"):
            return self.connector.epoch_stats(self.tasks)
        return {}, []

    def regularization_loss(self) -> torch.Tensor:
        """Extra loss the training engine adds (zero except DSelect-k's entropy regulariser)."""
        p = next(self.parameters())
        return torch.zeros((), device=p.device, dtype=p.dtype)

    # -- parameters ------------------------------------------------------------------------------------------------
    def _owner(self, name: str) -> str | None:
        """Task that owns a parameter, or None if it is shared."""
        if name.startswith(("heads.", "gates.")):
            return name.split(".")[1]
        if name.startswith("connector.") and self.connector is not None and hasattr(self.connector, "owner"):
            return self.connector.owner(name[len("connector."):])
        return None

    def named_task_specific_parameters(self, task: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters only task ``task`` uses (its head, gate, TESLA adapter)."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; model tasks: {self.tasks}")
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad and self._owner(n) == task)

    def task_specific_parameters(self, task: str) -> list[nn.Parameter]:
        """List of :meth:`named_task_specific_parameters`."""
        return [p for _, p in self.named_task_specific_parameters(task)]

    def named_trainable_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters every task uses (LoRA, SMA, experts, ResNet): the gradient-manipulation set."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad and self._owner(n) is None)

    def trainable_shared_parameters(self) -> list[nn.Parameter]:
        """List of :meth:`named_trainable_shared_parameters` (not heads, not task-specific adapters or gates)."""
        return [p for _, p in self.named_trainable_shared_parameters()]

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """``{component: {"total": n, "trainable": n}}`` plus a ``"total"`` row."""
        return parameter_report(self)

    # -- provenance / inference helpers ----------------------------------------------------------------------------
    @property
    def weights(self) -> dict:
        """Backbone weights provenance ``{"source": "random init" | path | hub, "sha256": ...}``."""
        return self.backbone.weights

    @property
    def pretrained_random_init(self) -> bool:
        """True when the backbone was randomly initialised."""
        return self.backbone.pretrained_random_init

    def merge_lora(self) -> "MultiTaskModel":
        """Fold every shared LoRA into its frozen weight (inference); task/expert adapters stay separate."""
        merge_lora(self)
        return self

    def unmerge_lora(self) -> "MultiTaskModel":
        """Undo :meth:`merge_lora`."""
        unmerge_lora(self)
        return self


class HPSModel(MultiTaskModel):
    """Hard parameter sharing: one encoder, one head per task."""

    arch = "hps"


class TESLAModel(MultiTaskModel):
    """TESLA: task t's head reads the feature map computed with task t's adapters (one batched pass)."""

    arch = "tesla"

    def __init__(self, backbone, heads, tasks, config=None, soft: bool = False):
        super().__init__(backbone, heads, tasks, config)
        self.soft = soft

    def _owner(self, name: str) -> str | None:
        owner = super()._owner(name)
        if owner is not None:
            return owner
        m = _TESLA_ALPHA.search(name) or (None if self.soft else _TESLA_ADAPTER.search(name))
        return self.tasks[int(m.group(1))] if m else None

    def _encode(self, images):
        out = self.backbone(images)  # maps (T, B, C, h, w): group t = task t
        return {t: (out.maps[i], None if out.tokens is None else out.tokens[i]) for i, t in enumerate(self.tasks)}

    def forward_per_task(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reference: a Python loop over tasks, each a full backbone pass with its own adapter (same result)."""
        outs = {}
        for i, t in enumerate(self.tasks):
            o = self.backbone(images, group=i)
            feats = self._post({t: (o.maps[0], None if o.tokens is None else o.tokens[0])})
            outs[t] = self._head(t, *feats[t], images)
        return outs


class MMoEModel(MultiTaskModel):
    """MMoE: E experts, per-task softmax gates on a pooled-image descriptor mix the expert feature maps."""

    arch = "mmoe"

    def __init__(self, backbone, heads, tasks, config=None, gate_pool: int = 8, **gate_kw):
        super().__init__(backbone, heads, tasks, config)
        self.num_experts = backbone.num_groups
        self.gate_pool = gate_pool
        self.gates = nn.ModuleDict({t: self._make_gate(3 * gate_pool * gate_pool, self.num_experts, **gate_kw)
                                    for t in tasks})
        self.last_gate_weights: dict[str, torch.Tensor] = {}

    def _make_gate(self, in_features: int, num_experts: int, **kw) -> nn.Module:
        return SoftmaxGate(in_features, num_experts)

    def _encode(self, images):
        out = self.backbone(images)  # maps (E, B, C, h, w)
        d = image_descriptor(images, self.gate_pool)
        feats, self._selectors = {}, {}
        for t in self.tasks:
            w, sel = self.gates[t](d)  # (B, E)
            self.last_gate_weights[t] = w.detach()
            self._selectors[t] = sel
            fmap = torch.einsum("be,ebchw->bchw", w, out.maps)
            tok = None if out.tokens is None else torch.einsum("be,ebc->bc", w, out.tokens)
            feats[t] = (fmap, tok)
        return feats


class DSelectKModel(MMoEModel):
    """DSelect-k gates; ``regularization_loss()`` = weight x selector entropy of the last forward (differentiable)."""

    arch = "dselect_k"

    def __init__(self, backbone, heads, tasks, config=None, gate_pool: int = 8, k: int = 2, gamma: float = 1.0,
                 entropy_weight: float = 1e-4):
        super().__init__(backbone, heads, tasks, config, gate_pool, k=k, gamma=gamma)
        self.entropy_weight = entropy_weight
        self._selectors = {}

    def _make_gate(self, in_features, num_experts, k=2, gamma=1.0):
        return DSelectKGate(in_features, num_experts, k=k, gamma=gamma)

    def regularization_loss(self) -> torch.Tensor:
        """``entropy_weight * sum_t entropy(selectors_t)`` from the last forward; add it to the training loss."""
        if not self._selectors:
            return super().regularization_loss()
        return self.entropy_weight * sum(DSelectKGate.entropy(s) for s in self._selectors.values())


ARCHITECTURES = {"hps": HPSModel, "single": HPSModel, "tesla": TESLAModel, "mmoe": MMoEModel,
                 "dselect_k": DSelectKModel}
