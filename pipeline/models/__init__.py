"""EfficientNetV2 model family: registry, blocks, timm weight exchange."""

from .blocks import PADDINGS, ConvBnAct, DropPath, FusedMBConv, LayerOptions, MBConv, Padding, SqueezeExcite
from .builder import VARIANTS, ArchSpec, StageSpec, VariantSpec
from .efficientnetv2 import (
    DEFAULT_DROP_PATH_RATE,
    EfficientNetV2,
    GradCheckpointing,
    ModelArgs,
    count_gmacs,
    count_params,
    create_model,
    get_variant,
    list_models,
    strip_prefixes,
)
from .timm_import import (
    create_model_from_timm,
    load_timm_state_dict,
    nearest_timm_variant,
    timm_key_map,
    timm_model_args,
    timm_model_options,
    timm_variant_of,
    to_timm_state_dict,
)

__all__ = [
    "DEFAULT_DROP_PATH_RATE", "PADDINGS", "VARIANTS", "ArchSpec", "ConvBnAct", "DropPath", "EfficientNetV2",
    "FusedMBConv", "GradCheckpointing", "LayerOptions", "MBConv", "ModelArgs", "Padding", "SqueezeExcite",
    "StageSpec", "VariantSpec", "count_gmacs", "count_params", "create_model", "create_model_from_timm", "get_variant",
    "list_models", "load_timm_state_dict", "nearest_timm_variant", "strip_prefixes", "timm_key_map",
    "timm_model_args", "timm_model_options", "timm_variant_of", "to_timm_state_dict",
]
