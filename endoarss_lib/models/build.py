"""``build_model``: options -> :class:`ModelConfig` (every default documented here, in one place) -> model."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from ..coerce import check_fields
from ..tasks import DEFAULT_TASKS, HeadSpec, TASKS as TASK_REGISTRY, check_tasks, get_task
from .architectures import ARCHITECTURES, MultiTaskModel
from .backbones import BACKBONES, VIT_LORA_TARGETS, build_backbone
from .connectors import CMOE_ROUTERS, CMoEConnector, released_grid
from .lora import QKV_CHUNKS
from .sma import SMA

def _f(default, help: str):
    """A ModelConfig field with its help text (the training command's ``--help`` lists it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


__all__ = ["CONNECTORS", "TOKEN_MAPS", "ModelConfig", "build_model", "build_model_from_config"]

DEFAULT_RANK = 4  # LoRA / TESLA rank (paper Table VI: r = 4 is best); the one place this default is written
_MOE = ("mmoe", "dselect_k")
CONNECTORS = (None, "cmoe")
TOKEN_MAPS = ("spatial", "released")


@dataclass
class ModelConfig:
    """All model options with their defaults (paper values unless noted)."""

    backbone: str = _f("dinov2_vitb14", "key of models.BACKBONES (dinov2_vitb14, dinov2_vits14, vit_mini_patch14, "
                                        "resnet101, test sizes vit_tiny_patch14, resnet_tiny)")
    arch: str = _f("hps", "hps | tesla | mmoe | dselect_k | single (hps with one task)")
    sma: bool = _f(False, "SMA before patch embedding (EndoARSS backbone = DINOv2 + SMA)")
    num_activities: int | None = _f(None, "K, required when \"cls\" in tasks")
    num_seg_classes: int | None = _f(None, "S incl. background, required when \"seg\" in tasks")
    tasks: tuple = _f(DEFAULT_TASKS, "tasks the model predicts, names from the task registry (endoarss_lib.tasks.TASKS): "
                                     "cls, seg, both (the default), or registered tasks such as presence")
    pretrained: Any = _f(False, "False (random init, loud for DINOv2) | a bundled weight name "
                                "(models.list_pretrained()) | local file path | True (timm hub, needs internet)")
    lora_rank: int = _f(DEFAULT_RANK, "shared LoRA rank r (Table VI); also the expert LoRA rank for mmoe / dselect_k "
                                      "on a ViT")
    image_size: int = _f(224, "multiple of the ViT patch (14) and of sma_patch_size when sma=True")
    # LoRA (paper Eq. 2-3)
    lora_alpha: float | None = _f(None, "LoRA scale alpha / r, for the shared LoRA and the TESLA / expert adapters; "
                                        "None -> alpha = r (scale 1)")
    lora_targets: tuple = _f(("attn.qkv",), "released code: (\"mlp.fc1\", \"mlp.fc2\"); valid: VIT_LORA_TARGETS")
    lora_qkv: tuple = _f(("q", "v"), "chunks of the fused qkv that LoRA adapts (paper: q and v; k untouched)")
    # TESLA (paper Eq. 5-6)
    tesla_rank: int | None = _f(None, "task-adapter rank; None -> lora_rank (DEFAULT_RANK if lora_rank is 0)")
    tesla_alpha: str = _f("onehot", "\"onehot\": adapter t serves task t only (explicit gradient separation); "
                                    "\"soft\": per task a learnable softmax mix over all adapters (logits start at "
                                    "0)")
    tesla_num_adapters: int | None = _f(None, "soft alpha only: number of adapters E (None -> number of tasks)")
    tesla_last_k: int | None = _f(None, "task adapters in the last k blocks only (None -> every block)")
    tesla_targets: tuple | None = _f(None, "layers with task adapters (None -> lora_targets); ViT only")
    # Mixtures of experts (mmoe, dselect_k)
    num_experts: int = _f(2, "experts E of mmoe / dselect_k")
    gate_pool: int = _f(8, "gate input: the image average-pooled to gate_pool x gate_pool (3 * gate_pool^2 numbers)")
    dselect_k: int = _f(2, "DSelect-k: number of selectors (non-zeros)")
    dselect_gamma: float = _f(1.0, "smooth-step width")
    dselect_entropy_weight: float = _f(1e-4, "weight of the entropy regulariser in model.regularization_loss()")
    # SMA (paper Sec. III-B)
    sma_dim: int = _f(512, "d (released: 512)")
    sma_patch_size: int = _f(7, "unfold patch side (released: 7)")
    sma_groups: int = _f(1, "EMA channel groups (released: 1)")
    sma_kernel_size: int = _f(3, "n of the local and fusion convs")
    sma_residual: bool = _f(False, "add the input back through a zero-initialised fusion (identity at start)")
    sma_trainable: bool = _f(True, "False reproduces the released code (SMA frozen at random init)")
    sma_checkpoint: bool = _f(False, "activation checkpointing of SMA's dim-wide part")
    # Heads (DeepLab-V3 style)
    head_channels: int = _f(256, "channels of the DeepLab-V3 heads")
    seg_rates: tuple | None = _f(None, "ASPP rates; None -> chosen from the feature-map size")
    seg_dropout: float = _f(0.5, "dropout after the ASPP projection (DeepLab-V3 and the released code: 0.5)")
    seg_detail_channels: int = _f(0, "channels of the segmentation head's image detail branch at output stride 4 "
                                     "(a DeepLab-V3+ style decoder that can draw objects smaller than a patch); 0: "
                                     "the paper's DeepLab-V3 head")
    cls_dropout: float = _f(0.0, "dropout before the activity classifier")
    cls_use_token: bool | None = _f(None, "concat the class token in the cls head; None -> when the backbone has one")
    # Features / backbone
    layerscale_init: float | None = _f(None, "ViT LayerScale start of a random-init backbone (None: timm's DINOv2 "
                                             "1e-5; 1.0 makes a frozen random ViT a fair baseline); loaded weights "
                                             "keep theirs")
    out_layers: tuple = _f((-1,), "ViT blocks whose (final-normed) patch tokens are concatenated along channels")
    resnet_output_stride: int = _f(16, "8 or 16 (dilated last stages)")
    weights_allow_missing: tuple = _f((), "fnmatch patterns of checkpoint keys allowed to be missing")
    weights_allow_unexpected: tuple = _f((), "fnmatch patterns of checkpoint keys allowed to be unexpected")
    # Connector between the backbone and the heads (docs/seed_components.md): None | "cmoe" (Uni-Med's CMoE)
    connector: str | None = _f(None, "between backbone and heads: null or 'cmoe' (Uni-Med's connector MoE)")
    cmoe_experts: int = _f(5, "CMoE experts E (Uni-Med: 5)")
    cmoe_router: str = _f("soft", "soft (sigmoid, normalised) | sparse (top-k softmax) | hard (task t -> expert t) | "
                                  "constant (1/E)")
    cmoe_hidden: int | None = _f(None, "experts' hidden width; None -> the feature width D")
    cmoe_router_hidden: int | None = _f(None, "router's hidden width; None -> D")
    cmoe_top_k: int = _f(2, "experts kept by the sparse router")
    # Feature map for the heads: "spatial" (B, C, H/14, W/14) | "released" (the released code's bug: tokens viewed as
    # (B, N, gh, gw), i.e. tokens become channels; ViT only; for the paper-vs-code comparison)
    token_map: str = _f("spatial", "feature map for the heads: 'spatial' (B, C, H/14, W/14) or 'released' (the "
                                   "released code's reshape: tokens become channels; ViT only)")
    # Class counts of tasks that have no field of their own (num_activities / num_seg_classes above)
    task_classes: dict = _f({}, "class counts of the tasks without a field of their own above ({task: count}, e.g. "
                                "{presence: 2}); taken from the dataset")

    def __post_init__(self):
        if isinstance(self.pretrained, os.PathLike):
            self.pretrained = os.fspath(self.pretrained)
        if isinstance(self.pretrained, str) and self.pretrained.strip().lower() in ("false", "no", "off", "none", ""):
            self.pretrained = False  # "model.pretrained=false" from a command line
        check_fields(self, prefix="model.")
        for f in ("tasks", "lora_targets", "lora_qkv", "out_layers", "weights_allow_missing",
                  "weights_allow_unexpected"):
            v = getattr(self, f)
            setattr(self, f, (v,) if isinstance(v, str) else tuple(v))
        if self.tesla_targets is not None:
            self.tesla_targets = ((self.tesla_targets,) if isinstance(self.tesla_targets, str)
                                  else tuple(self.tesla_targets))
        if self.seg_rates is not None:
            self.seg_rates = tuple(self.seg_rates)
        self.validate()

    def _classes_name(self, task: str) -> str:
        field_name = get_task(task).classes_field
        return field_name if field_name in self.__dataclass_fields__ else f"task_classes[{task!r}]"

    def classes_of(self, task: str) -> int | None:
        """The class count of ``task``: its own field (``num_activities``, ``num_seg_classes``) or
        ``task_classes[task]``."""
        field_name = get_task(task).classes_field
        return getattr(self, field_name) if field_name in self.__dataclass_fields__ else self.task_classes.get(task)

    @property
    def adapter_rank(self) -> int:
        """Rank of the TESLA task adapters: ``tesla_rank``, else ``lora_rank``, else :data:`DEFAULT_RANK`."""
        return self.tesla_rank or self.lora_rank or DEFAULT_RANK

    @property
    def label(self) -> str:
        """The model's name in tables: ``<backbone>[+sma] | <arch>`` (plus the connector when there is one)."""
        name = f"{self.backbone}{'+sma' if self.sma else ''} | {self.arch}"
        if self.arch == "single":
            name += f" {'+'.join(self.tasks)}"
        return name + (f" + {self.connector}" if self.connector else "")

    @property
    def paper_backbone(self) -> str:
        """The paper's backbone vocabulary: resnet101 (any ResNet), dinov2 (any ViT), endoarss (a ViT with SMA)."""
        if self.family == "resnet":
            return "resnet101"
        return "endoarss" if self.sma else "dinov2"

    @classmethod
    def from_label(cls, name: str, arch: str = "hps", **options) -> "ModelConfig":
        """``ModelConfig.from_label("dinov2_vitb14+sma", "tesla", ...)``: a backbone name with an optional ``+sma``."""
        base, _, suffix = name.partition("+")
        if suffix not in ("", "sma"):
            raise ValueError(f"backbone={name!r}: expected a registry name, optionally with '+sma'")
        return cls(backbone=base, arch=arch, sma=suffix == "sma" or options.pop("sma", False), **options)

    @property
    def family(self) -> str:
        """``"vit"`` or ``"resnet"``."""
        return BACKBONES[self.backbone].family

    def to_dict(self) -> dict:
        """Plain dict (for result rows / yaml)."""
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError on an inconsistent configuration."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; valid: {sorted(BACKBONES)}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {sorted(ARCHITECTURES)}")
        check_tasks(self.tasks)
        if self.arch == "single" and len(self.tasks) != 1:
            raise ValueError(f"arch='single' needs exactly one task, got tasks={self.tasks}")
        if not isinstance(self.task_classes, dict) or any(t not in TASK_REGISTRY for t in self.task_classes):
            raise ValueError(f"task_classes={self.task_classes!r} must map registered task names to class counts")
        for task in self.tasks:
            v, low = self.classes_of(task), get_task(task).min_classes
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{self._classes_name(task)} must be an int >= {low} for task {task!r}, got {v!r}")
        if not (self.pretrained is True or self.pretrained is False or self.pretrained is None
                or isinstance(self.pretrained, str)):
            raise ValueError(f"pretrained must be False, True or a file path, got {self.pretrained!r}")
        cfg = BACKBONES[self.backbone]
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if cfg.family == "vit" and self.image_size % cfg.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of the patch size {cfg.patch_size} "
                             f"of {self.backbone}")
        if self.sma and self.image_size % self.sma_patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of sma_patch_size="
                             f"{self.sma_patch_size} (e.g. 224 = 32 x 7)")
        if self.lora_rank < 0 or (self.tesla_rank is not None and self.tesla_rank < 1):
            raise ValueError(f"lora_rank must be >= 0 and tesla_rank >= 1, got {self.lora_rank}, {self.tesla_rank}")
        if self.arch in _MOE and cfg.family == "vit" and self.lora_rank < 1:
            raise ValueError(f"arch={self.arch!r} on a ViT needs lora_rank >= 1 (experts are LoRA sets)")
        for t in self.lora_targets + (self.tesla_targets or ()):
            if t not in VIT_LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; valid: {VIT_LORA_TARGETS}")
        if not self.lora_qkv or any(c not in QKV_CHUNKS for c in self.lora_qkv):
            raise ValueError(f"lora_qkv={self.lora_qkv!r} must name some of {tuple(QKV_CHUNKS)}")
        if self.tesla_alpha not in ("onehot", "soft"):
            raise ValueError(f"tesla_alpha must be 'onehot' or 'soft', got {self.tesla_alpha!r}")
        if self.tesla_num_adapters is not None and self.tesla_alpha != "soft":
            raise ValueError("tesla_num_adapters needs tesla_alpha='soft' (one-hot routing: one adapter per task)")
        if self.tesla_last_k is not None and not 1 <= self.tesla_last_k <= cfg.depth:
            raise ValueError(f"tesla_last_k={self.tesla_last_k} must be in [1, {cfg.depth}] for {self.backbone}")
        if self.arch in _MOE and self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {self.num_experts}")
        if self.arch == "dselect_k" and not 1 <= self.dselect_k <= self.num_experts:
            raise ValueError(f"dselect_k={self.dselect_k} must be in [1, num_experts={self.num_experts}]")
        if self.cls_use_token and cfg.family != "vit":
            raise ValueError(f"cls_use_token=True needs a class token; {self.backbone} has none")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {self.connector!r}")
        if self.connector == "cmoe":
            if self.cmoe_router not in CMOE_ROUTERS:
                raise ValueError(f"cmoe_router must be one of {CMOE_ROUTERS}, got {self.cmoe_router!r}")
            if isinstance(self.cmoe_experts, bool) or not isinstance(self.cmoe_experts, int) or self.cmoe_experts < 1:
                raise ValueError(f"cmoe_experts must be an int >= 1, got {self.cmoe_experts!r}")
            if self.cmoe_router == "hard" and self.cmoe_experts < len(self.tasks):
                raise ValueError(f"cmoe_router='hard' needs cmoe_experts >= {len(self.tasks)} (one per task), got "
                                 f"{self.cmoe_experts}")
            if self.cmoe_router == "sparse" and not 1 <= self.cmoe_top_k <= self.cmoe_experts:
                raise ValueError(f"cmoe_top_k={self.cmoe_top_k} must be in [1, cmoe_experts={self.cmoe_experts}]")
            for name in ("cmoe_hidden", "cmoe_router_hidden"):
                v = getattr(self, name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ValueError(f"{name} must be None or a positive int, got {v!r}")
        if self.layerscale_init is not None:
            if cfg.family != "vit":
                raise ValueError(f"layerscale_init is a ViT option; {self.backbone} has no LayerScale")
            if isinstance(self.layerscale_init, bool) or not isinstance(self.layerscale_init, (int, float)) \
                    or not self.layerscale_init > 0:
                raise ValueError(f"layerscale_init must be a positive number or None, got {self.layerscale_init!r}")
        if self.token_map not in TOKEN_MAPS:
            raise ValueError(f"token_map must be one of {TOKEN_MAPS}, got {self.token_map!r}")
        if self.token_map == "released" and cfg.family != "vit":
            raise ValueError(f"token_map='released' reshapes ViT tokens; {self.backbone} has none")


def build_model_from_config(config: ModelConfig) -> MultiTaskModel:
    """Model for a validated :class:`ModelConfig` (stored as ``model.config``)."""
    c = config
    c.validate()
    sma = None
    if c.sma:
        sma = SMA(in_chans=3, dim=c.sma_dim, patch_size=c.sma_patch_size, groups=c.sma_groups,
                  kernel_size=c.sma_kernel_size, residual=c.sma_residual, checkpoint=c.sma_checkpoint)
        sma.requires_grad_(c.sma_trainable)
    kw = dict(allow_missing=c.weights_allow_missing, allow_unexpected=c.weights_allow_unexpected)
    if c.layerscale_init is not None:
        kw["layerscale_init"] = c.layerscale_init
    num_tasks = len(c.tasks)
    tesla_rank = c.adapter_rank
    soft = c.tesla_alpha == "soft"
    if c.family == "vit":
        bb = build_backbone(c.backbone, c.image_size, c.pretrained, sma, out_layers=c.out_layers, **kw)
        common = dict(alpha=c.lora_alpha, qkv=c.lora_qkv)
        if c.arch == "tesla":
            bb.add_adapters(rank=c.lora_rank, targets=c.lora_targets, num_groups=num_tasks, group_kind="tesla",
                            group_targets=c.tesla_targets or c.lora_targets, group_rank=tesla_rank,
                            group_alpha=c.lora_alpha, soft=soft, num_adapters=c.tesla_num_adapters,
                            last_k=c.tesla_last_k, **common)
        elif c.arch in _MOE:
            bb.add_adapters(rank=0, targets=(), num_groups=c.num_experts, group_kind="expert",
                            group_targets=c.lora_targets, group_rank=c.lora_rank, group_alpha=c.lora_alpha,
                            **common)
        else:
            bb.add_adapters(rank=c.lora_rank, targets=c.lora_targets, **common)
    else:
        bb = build_backbone(c.backbone, c.image_size, c.pretrained, sma, output_stride=c.resnet_output_stride,
                            num_experts=c.num_experts if c.arch in _MOE else 0, **kw)
        if c.arch == "tesla":
            bb.add_adapters(num_groups=num_tasks, group_rank=tesla_rank, group_alpha=c.lora_alpha, soft=soft,
                            num_adapters=c.tesla_num_adapters, last_k=c.tesla_last_k)
    feature_size = -(-c.image_size // bb.stride)
    head_channels_in, grid = bb.out_channels, None
    if c.token_map == "released":  # heads read N token-channels over a gh x gw grid of feature dimensions
        grid = released_grid(bb.out_channels)
        head_channels_in, feature_size = feature_size * feature_size, min(grid)
    use_token = (bb.token_dim is not None) if c.cls_use_token is None else c.cls_use_token
    heads: dict[str, nn.Module] = {
        t: get_task(t).make_head(HeadSpec(head_channels_in, c.classes_of(t), c, feature_size,
                                          bb.token_dim if use_token else None)) for t in c.tasks}
    cls = ARCHITECTURES[c.arch]
    if c.arch == "tesla":
        model = cls(bb, heads, c.tasks, c, soft=soft)
    elif c.arch == "mmoe":
        model = cls(bb, heads, c.tasks, c, gate_pool=c.gate_pool)
    elif c.arch == "dselect_k":
        model = cls(bb, heads, c.tasks, c, gate_pool=c.gate_pool, k=c.dselect_k, gamma=c.dselect_gamma,
                    entropy_weight=c.dselect_entropy_weight)
    else:
        model = cls(bb, heads, c.tasks, c)
    if c.connector == "cmoe":
        model.connector = CMoEConnector(bb.out_channels, c.tasks, num_experts=c.cmoe_experts, router=c.cmoe_router,
                                        hidden=c.cmoe_hidden, router_hidden=c.cmoe_router_hidden,
                                        top_k=c.cmoe_top_k)
    if c.token_map == "released":
        model.token_map, model.released_grid = "released", grid
    return model


def build_model(
    backbone: str = "dinov2_vitb14",
    arch: str = "hps",
    sma: bool = False,
    num_activities: int | None = None,
    num_seg_classes: int | None = None,
    tasks=DEFAULT_TASKS,
    pretrained=False,
    lora_rank: int = 4,
    image_size: int = 224,
    **options,
) -> MultiTaskModel:
    """Build a multi-task (or single-task) model; ``options`` are :class:`ModelConfig` fields (TypeError otherwise).

    ``forward(images)`` returns ``{task: logits}`` for the tasks asked for (``{"cls": (B, K), "seg": (B, S, H, W)}``
    by default; a task without a class-count argument takes ``task_classes={task: count}``). E.g. Uni-Med's
    connector: ``build_model(..., connector="cmoe", cmoe_experts=5, cmoe_router="soft")``.
    """
    valid = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; valid options: {sorted(valid - {'backbone', 'arch'})}")
    cfg = ModelConfig(backbone=backbone, arch=arch, sma=sma, num_activities=num_activities,
                      num_seg_classes=num_seg_classes, tasks=tasks, pretrained=pretrained, lora_rank=lora_rank,
                      image_size=image_size, **options)
    return build_model_from_config(cfg)
