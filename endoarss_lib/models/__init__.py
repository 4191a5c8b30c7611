"""Models: timm backbones (DINOv2, ResNet), LoRA / TESLA adapters, SMA, DeepLab-style heads, MTL architectures.

Entry point: :func:`build_model` (options documented in :class:`ModelConfig`); :func:`count_gflops` and
``model.parameter_report()`` for cost. Uni-Med's CMoE connector and the released code's token reshape live in
:mod:`.connectors`. The authors' released model (to load their checkpoints): :func:`load_released_checkpoint`,
:mod:`.released`.
"""
from .architectures import ARCHITECTURES, DSelectKModel, HPSModel, MMoEModel, MultiTaskModel, TESLAModel
from .backbones import (
    BACKBONES,
    VIT_LORA_TARGETS,
    BackboneConfig,
    BackboneOutput,
    GroupBatchNorm2d,
    ResNetBackbone,
    ViTBackbone,
    build_backbone,
    create_timm_backbone,
)
from .build import CONNECTORS, TOKEN_MAPS, ModelConfig, build_model, build_model_from_config
from .connectors import (CMOE_ROUTERS, CMoEConnector, released_grid, released_token_map, routing_divergence,
                         routing_entropy, spatial_token_map, token_position_probe, tokens_from_map)
from .gates import DSelectKGate, SoftmaxGate, image_descriptor
from .heads import ClassificationHead, SegmentationHead
from .released import (RELEASED_CHECKPOINTS, ReleasedConfig, ReleasedModel, build_released_model,
                       load_released_checkpoint, read_released_state_dict, to_released_input)
from .lora import LoRAConv1x1, LoRALinear, lora_modules, merge_lora, route_to_group, unmerge_lora
from .report import count_gflops, parameter_report
from .sma import SMA
from .pretrained import DEFAULT_PRETRAINED, PretrainedWeights, get_pretrained, list_pretrained
from .weights import RandomInitWarning, WeightsError, load_state_dict_strict, read_state_dict

__all__ = [
    "build_model", "build_model_from_config", "ModelConfig", "count_gflops", "parameter_report",
    "BACKBONES", "BackboneConfig", "BackboneOutput", "ARCHITECTURES", "VIT_LORA_TARGETS",
    "ViTBackbone", "ResNetBackbone", "GroupBatchNorm2d", "build_backbone", "create_timm_backbone",
    "MultiTaskModel", "HPSModel", "TESLAModel", "MMoEModel", "DSelectKModel",
    "LoRALinear", "LoRAConv1x1", "lora_modules", "merge_lora", "unmerge_lora", "route_to_group",
    "SoftmaxGate", "DSelectKGate", "image_descriptor",
    "SMA", "SegmentationHead", "ClassificationHead",
    "CMoEConnector", "CMOE_ROUTERS", "CONNECTORS", "TOKEN_MAPS", "released_grid", "released_token_map",
    "spatial_token_map", "tokens_from_map", "token_position_probe", "routing_entropy", "routing_divergence",
    "list_pretrained", "get_pretrained", "PretrainedWeights", "DEFAULT_PRETRAINED",
    "WeightsError", "RandomInitWarning", "load_state_dict_strict", "read_state_dict",
    "ReleasedConfig", "ReleasedModel", "build_released_model", "load_released_checkpoint", "read_released_state_dict",
    "to_released_input", "RELEASED_CHECKPOINTS",
]
