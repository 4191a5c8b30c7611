"""Self-supervised pretraining of the project's small foundation model on unlabelled synthetic endoscopic images.

EndoARSS adapts a *frozen* foundation model (DINOv2) with LoRA, TESLA and SMA. No DINOv2 weights can ship with this
repository, and a randomly initialised ViT gives the adapters nothing to adapt, so the project pretrains a small ViT
of DINOv2's architecture (timm's DINOv2 code path: patch 14, LayerScale) with DINOv2's own recipe, scaled down:

* **DINO** (Caron et al., ICCV 2021): a student matches a momentum teacher's softmax over prototypes of the class
  token across multi-crop views (2 global + L local crops), teacher outputs centred and sharpened;
* **iBOT** (Zhou et al., ICLR 2022): the student sees some patch tokens masked and predicts the teacher's prototype
  distribution of the unmasked patch tokens (the dense, patch-level objective that makes frozen features segment);
* **KoLeo** (Sablayrolles et al., 2019; DINOv2): spreads the student's class tokens within a batch.

Images come from the synthetic generator (:mod:`endoarss_lib.data.synthetic`) with seeds disjoint from every dataset
the notebooks and tests draw (:func:`pretrain_rng`), across the three presets (the domain-shifted one included), and
no label or mask is ever read. ``python -m endoarss_lib.foundation --help`` lists the recipe's options; the run writes
``<name>.safetensors`` (the teacher backbone, timm key names) and ``<name>.json`` (the weight record: recipe, data
seeds and counts, steps, wall time, sha256 and the evaluation of :func:`evaluate_backbone`).

One small file per concern, in DINOv2's manner:

* :mod:`.recipe`: :class:`PretrainConfig`; :mod:`.images`: the unlabelled pool; :mod:`.crops`: multi-crop;
* :mod:`.heads`: the DINO / iBOT head; :mod:`.losses`: Sinkhorn-Knopp targets and KoLeo; :mod:`.objective`: student,
  teacher and the loss; :mod:`.schedules`: the recipe's schedules and parameter groups;
* :mod:`.loop`: :func:`pretrain` (checkpoints, the weights and their record); :mod:`.probes`: linear probes of frozen
  features; :mod:`.cli`: the command line (``endoarss-pretrain``).

Layer: above the data, the models and the training engine (it borrows ``native_bf16``); nothing in the library
imports it. Before the layout of subpackages this was the module ``endoarss_lib.pretrain``: that path still imports
this package (with a DeprecationWarning).
"""
from .cli import main
from .crops import MultiCrop
from .heads import DINOHead
from .images import pretrain_rng, render_pool
from .loop import backbone_state_dict, pretrain
from .losses import sinkhorn_knopp
from .objective import SelfDistillation
from .probes import evaluate_backbone, extract_features, record_metrics
from .recipe import PRETRAIN_PRESETS, PRETRAIN_TAG, PretrainConfig

__all__ = ["PretrainConfig", "pretrain_rng", "render_pool", "MultiCrop", "DINOHead", "SelfDistillation",
           "sinkhorn_knopp", "pretrain", "extract_features", "evaluate_backbone", "main", "PRETRAIN_PRESETS",
           "PRETRAIN_TAG", "backbone_state_dict", "record_metrics"]
