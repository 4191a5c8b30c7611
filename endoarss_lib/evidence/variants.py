"""The featured configuration, said once, and the named variants the claims compare against it.

``EndoARSS`` is the paper's model on this project's stand-in foundation model: the frozen synthetic-pretrained ViT
(``synthdino_vit_mini14``, DINOv2's architecture, not DINOv2) + LoRA (q, v) + TESLA + SMA. Every variant is the
featured configuration with a few model options or run fields changed (``{"model": {...}, **fields}``), so two
variants differ exactly in what their names say. Notebooks pick the variants their claims need (:func:`pick`) and
hand them to ``Experiment.variants``.

Where it differs from the paper, and why:

* **weighting: EW** (the plain sum of the losses), not DB-MTL (the paper's MTLESD weighting): DB-MTL needs one
  backward pass per task and costs 1.48x EW per training step on this model (3.43 vs 2.32 s per batch of 8 at
  224 px, 2 CPU cores), which the demonstration's ~50 trainings on 2 CPU cores cannot afford; ``DB-MTL`` is a variant, and its claim against EW is decided in notebook 02;
* **SMA width** ``sma_dim`` 32 (paper and released code: 512, for a 768-wide ViT-B; the stand-in is 192 wide);
* **a detail branch in the segmentation head** (``seg_detail_channels``: the image at output stride 4, DeepLab-V3+
  style; see ``models.heads.SegmentationHead``), so that classes smaller than one 14 px patch (marking spots,
  bleeding) can be drawn on the 16 x 16 token grid; the paper's plain DeepLab-V3 head is the variant
  ``paper head (no detail)``, and the claim that the branch helps is decided in notebook 07.
"""
from __future__ import annotations

import copy
from typing import Iterable

__all__ = ["FEATURED", "FEATURED_MODEL", "FEATURED_FIELDS", "VARIANTS", "CNN", "pick", "variant_options",
           "NOTEBOOK_VARIANTS", "NOTEBOOK_DATASETS", "notebook_variants",
           "featured_label", "featured_model", "TABLE5_ROWS"]

FEATURED = "EndoARSS"
CNN = "resnet_tiny"  # the trainable CNN of the rows without DINOv2 (paper: ResNet-101)
FEATURED_MODEL = {"backbone": "vit_mini_patch14", "pretrained": "synthdino_vit_mini14", "arch": "tesla", "sma": True,
                  "sma_dim": 32, "seg_detail_channels": 32}
FEATURED_FIELDS = {"weighting": "ew"}
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
    # the weighting (the paper's MTLESD rows use DB-MTL) and the segmentation head
    "DB-MTL": {"weighting": "db_mtl"},
    "paper head (no detail)": {"model": {"seg_detail_channels": 0}},
    # seed components
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


def featured_model(backbone: str = "") -> dict:
    """The featured model's options; ``backbone`` (e.g. ``dinov2_vitb14`` for real work) replaces the stand-in ViT,
    whose bundled weights then do not apply (give the backbone's weights file to ``Experiment(weights=...)``)."""
    model = copy.deepcopy(FEATURED_MODEL)
    if backbone and backbone != model["backbone"]:
        model["backbone"] = backbone
        model.pop("pretrained")
    return model


# Table V, row for row (paper's order): which named variant each row is (DINOv2 / TESLA / SMA on or off; MMoE when
# TESLA is off). tests/test_fidelity.py checks them against the transcribed table.
TABLE5_ROWS: dict[int, str] = {1: "ResNet + MMoE", 2: "MMoE (no SMA)", 3: "ResNet + TESLA", 4: "TESLA (no SMA)",
                               5: "MMoE + SMA", 6: FEATURED}


# The variants each notebook trains (its claims' sides, and what its figures show), by notebook; a notebook with two
# datasets has a second entry "<notebook>:<role>". scripts/demonstration_runs.py trains them all, in this order.
NOTEBOOK_VARIANTS: dict[str, list[str]] = {
    "04_ablation_components": [*TABLE5_ROWS.values(), "pretraining off"],
    "02_main_results": [FEATURED, "MMoE + SMA", "HPS + SMA", "segmentation only", "activity only", "DB-MTL"],
    "07_segmentation_gallery": [FEATURED, "segmentation only", "paper head (no detail)"],
    "05_ablation_rank": ["rank 1", FEATURED, "rank 16"],
    "09_task_conflict": [FEATURED, "HPS + SMA", "HPS + CMoE"],
    "06_robustness": [FEATURED, "ResNet + MMoE", "ResNet + DSelect-k"],
    "10_seed_components": [FEATURED, "HPS + SMA", "HPS + CMoE", "TESLA + CMoE", "GM-Coord"],
    "10_seed_components:longtail": [FEATURED, "CGL"],
    "03_generalisation": [FEATURED],
    "11_paper_vs_released_code": [FEATURED, "SMA frozen (released)", "token map (released)",
                                  "selection on test (released)"],
    "00_quickstart": [FEATURED],
}
NOTEBOOK_DATASETS = {"03_generalisation": "mtlendovis", "10_seed_components:longtail": "mtlendovis"}


def notebook_variants(notebook: str) -> dict[str, dict]:
    """``{name: changes}`` of the variants ``notebook`` trains (``"10_seed_components:longtail"`` for a second
    dataset's)."""
    if notebook not in NOTEBOOK_VARIANTS:
        raise KeyError(f"no variants for {notebook!r}; notebooks: {list(NOTEBOOK_VARIANTS)}")
    return pick(NOTEBOOK_VARIANTS[notebook])
