"""The featured configuration, said once, and the named variants the claims compare against it.

``EndoARSS`` is the paper's model on this project's stand-in foundation model: the frozen synthetic-pretrained ViT
(``synthdino_vit_mini14``, DINOv2's architecture, not DINOv2) + LoRA (q, v) + TESLA + SMA, trained with DB-MTL (the
paper's weighting on MTLESD). Every variant is the featured configuration with a few model options or run fields
changed (``{"model": {...}, **fields}``), so two variants differ exactly in what their names say. Notebooks pick the
variants their claims need (:func:`pick`) and hand them to ``Experiment.variants``.

Two choices differ from the paper's numbers, for the stand-in's size: SMA's width ``sma_dim`` is 32 (paper and
released code: 512, for a 768-wide ViT-B; the stand-in is 192 wide), and the heads keep the paper's 256 channels.
The segmentation head adds a detail branch (``seg_detail_channels``; see ``models.heads.SegmentationHead``) so that
classes smaller than one 14 px patch can be drawn on the 16 x 16 token grid; the paper's plain DeepLab-V3 head is
the variant ``paper head (no detail)``.
"""
from __future__ import annotations

import copy
from typing import Iterable

__all__ = ["FEATURED", "FEATURED_MODEL", "FEATURED_FIELDS", "VARIANTS", "CNN", "pick", "variant_options",
           "featured_label"]

FEATURED = "EndoARSS"
CNN = "resnet_tiny"  # the trainable CNN of the rows without DINOv2 (paper: ResNet-101)
FEATURED_MODEL = {"backbone": "vit_mini_patch14", "pretrained": "synthdino_vit_mini14", "arch": "tesla", "sma": True,
                  "sma_dim": 32}
FEATURED_FIELDS = {"weighting": "db_mtl"}
_CNN_MODEL = {"backbone": CNN, "pretrained": False, "sma": False}
_CMOE = {"connector": "cmoe", "cmoe_router": "soft", "cmoe_experts": 5}

# name -> changes to the featured configuration: {"model": {model options}, other TrainConfig fields}
VARIANTS: dict[str, dict] = {
    FEATURED: {},
    # architectures (Tables II / III)
    "MMoE + SMA": {"model": {"arch": "mmoe"}},
    "HPS + SMA": {"model": {"arch": "hps"}},
    "segmentation only": {"model": {"arch": "single", "tasks": ["seg"]}},
    "activity only": {"model": {"arch": "single", "tasks": ["cls"]}},
    # components (Table V)
    "TESLA (no SMA)": {"model": {"sma": False}},
    "MMoE (no SMA)": {"model": {"arch": "mmoe", "sma": False}},
    "ResNet + MMoE": {"model": {**_CNN_MODEL, "arch": "mmoe"}},
    "ResNet + TESLA": {"model": {**_CNN_MODEL, "arch": "tesla"}},
    "ResNet + DSelect-k": {"model": {**_CNN_MODEL, "arch": "dselect_k"}},
    "pretraining off": {"model": {"pretrained": False, "layerscale_init": 1.0}},
    # rank (Table VI)
    "rank 1": {"model": {"lora_rank": 1}},
    "rank 16": {"model": {"lora_rank": 16}},
    # seed components
    "EW": {"weighting": "ew"},
    "GM-Coord": {"weighting": "gm_coord", "weighting_hparams": {"alpha": 0.1}},
    "HPS + CMoE": {"model": {"arch": "hps", **_CMOE}},
    "TESLA + CMoE": {"model": _CMOE},
    "CGL": {"cls_loss": "cgl", "cls_loss_hparams": {"p": 0.1}},
    # the released code's choices (notebook 11)
    "SMA frozen (released)": {"model": {"sma_trainable": False}},
    "token map (released)": {"model": {"token_map": "released"}},
    "selection on test (released)": {"select_on": "test"},
}


def variant_options(name: str) -> dict:
    """A copy of the changes that make variant ``name`` (KeyError listing the variants)."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; variants: {list(VARIANTS)}")
    return copy.deepcopy(VARIANTS[name])


def pick(names: Iterable[str]) -> dict[str, dict]:
    """``{name: changes}`` of the named variants, in the given order."""
    return {n: variant_options(n) for n in names}


def featured_label() -> str:
    """One line naming the featured configuration (for captions)."""
    m = FEATURED_MODEL
    return (f"{FEATURED}: frozen {m['backbone']} ({m['pretrained']}, synthetic-pretrained, not DINOv2) + LoRA + "
            f"{m['arch'].upper()} + SMA (d = {m['sma_dim']}), {FEATURED_FIELDS['weighting']}")
