"""EfficientNetV2 model family: registry, blocks, timm weight exchange."""

from .blocks import ConvBnAct, DropPath, FusedMBConv, LayerOptions, MBConv, SqueezeExcite
from .builder import VARIANTS, ArchSpec, StageSpec, VariantSpec
from .efficientnetv2 import (EfficientNetV2, count_gmacs, count_params, create_model, get_variant, list_models,
                             strip_prefixes)
from .timm_import import load_timm_state_dict, timm_key_map, timm_model_options, to_timm_state_dict

__all__ = [
    "ArchSpec", "ConvBnAct", "DropPath", "EfficientNetV2", "FusedMBConv", "LayerOptions", "MBConv",
    "SqueezeExcite", "StageSpec", "VARIANTS", "VariantSpec", "count_gmacs", "count_params", "create_model",
    "get_variant", "list_models", "load_timm_state_dict", "strip_prefixes", "timm_key_map", "timm_model_options",
    "to_timm_state_dict",
]
