"""The pretraining recipe: :class:`PretrainConfig` (its defaults made the bundled ``synthdino_vit_mini14`` weights),
the presets the unlabelled images come from, and the recipe as the weight record stores it (:func:`_config_json`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..data.synthetic import SYNTHETIC_PRESETS

__all__ = ["PretrainConfig", "PRETRAIN_PRESETS", "PRETRAIN_TAG"]

# SeedSequence key of pretraining image i: [PRETRAIN_TAG, seed, preset id, i]. Dataset images use the 5-entry key
# [seed, preset id, split id, activity, k] (``synthetic.sample_rng``): a different key, hence a disjoint stream.
PRETRAIN_TAG = 0x70726574  # "pret"
PRETRAIN_PRESETS = ("mtlesd", "mtlendovis", "mtlendovis_gen")


@dataclass
class PretrainConfig:
    """The pretraining recipe (defaults: the bundled ``synthdino_vit_mini14`` weights; about 2 h on 2 CPU cores)."""

    name: str = "synthdino_vit_mini14"  # weight record name (file stem)
    backbone: str = "vit_mini_patch14"  # key of models.BACKBONES (a DINOv2-architecture ViT)
    layerscale_init: float = 0.1  # LayerScale start value (learned; timm's DINOv2 default is 1e-5)
    # data: rendered once into memory, uint8
    presets: tuple = PRETRAIN_PRESETS
    pool_size: int = 12_000  # images rendered (split evenly over the presets; activities drawn uniformly)
    render_size: int = 160  # side of the rendered images (crops are cut from them)
    data_seed: int = 0
    # multi-crop (DINO)
    global_size: int = 112
    local_size: int = 56
    num_local: int = 4
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    colour_jitter: float = 0.4  # brightness / contrast / saturation strength (hue = strength / 4), p = 0.8
    # objectives
    out_dim: int = 512  # prototypes of the DINO head
    patch_out_dim: int = 512  # prototypes of the iBOT head
    head_hidden: int = 512
    head_bottleneck: int = 128
    head_bn: bool = True  # batch norm in the heads' MLPs (see DINOHead)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3  # fraction of the run over which the teacher temperature rises
    centering: str = "sinkhorn"  # teacher targets: "sinkhorn" (Sinkhorn-Knopp, DINOv2) | "ema" (DINO's centre)
    center_momentum: float = 0.9  # "ema" centering only
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5  # share of global crops that get masked patches
    mask_ratio: tuple = (0.1, 0.5)
    # optimisation
    batch_size: int = 64
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup: float = 0.05  # fraction of the run
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.99  # teacher EMA momentum at the start (cosine to 1)
    clip_grad: float = 3.0
    steps: int = 1400  # optimisation steps (0: as many as fit in ``minutes``; a step count reproduces, a time budget
    #                    depends on the machine)
    minutes: float = 50.0  # time budget when steps == 0 (the schedules follow the elapsed time)
    amp: str = "auto"  # bf16 autocast: "auto" (where bf16 is native: CUDA, CPUs with AVX512-BF16 / AMX), "bf16" or
    #                    "off"; master weights stay fp32 (the record's training.amp says what was used)
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads on CPU (0: leave torch's default)
    log_every: int = 20
    checkpoint_every: int = 100  # steps between resumable checkpoints (atomic)

    def __post_init__(self):
        for f in ("presets", "global_scale", "local_scale", "mask_ratio"):
            setattr(self, f, tuple(getattr(self, f)))
        bad = [p for p in self.presets if p not in SYNTHETIC_PRESETS]
        if bad or not self.presets:
            raise ValueError(f"presets={self.presets!r}: expected names from {sorted(SYNTHETIC_PRESETS)}")
        for name in ("pool_size", "render_size", "global_size", "local_size", "batch_size", "out_dim",
                     "patch_out_dim", "head_hidden", "head_bottleneck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"pretrain {name}={v!r}: expected a positive int")
        if self.global_size % 14 or self.local_size % 14:
            raise ValueError(f"global_size={self.global_size} and local_size={self.local_size} must be multiples of "
                             "the patch size 14")
        if self.centering not in ("sinkhorn", "ema"):
            raise ValueError(f"pretrain centering={self.centering!r}: expected 'sinkhorn' or 'ema'")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"pretrain amp={self.amp!r}: expected 'auto', 'bf16' or 'off'")
        if self.steps < 0 or (self.steps == 0 and self.minutes <= 0):
            raise ValueError("pretrain: give steps >= 1 or minutes > 0")


def _config_json(cfg: PretrainConfig) -> dict:
    d = asdict(cfg)
    for k in ("device", "threads", "log_every", "checkpoint_every"):
        d.pop(k)
    return json.loads(json.dumps(d))
