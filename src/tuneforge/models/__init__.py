"""Pretrained backbones from aliases, local Hugging Face directories and timm files.

``load_model(name)`` returns a :class:`LoadedModel`: the backbone without a task
head, its :class:`ModelInfo` (layer groups stem -> top, feature size, default
LoRA targets, preprocessing, a rebuild spec) and, for text, the tokenizer.
Heavy libraries (transformers, timm) are imported only inside the loaders.
"""

from .aliases import known_aliases, load_imagenet_efficientnet_lite0
from .info import FAMILIES, Family, LoadedModel, ModelInfo, group_param_names
from .loader import build_model_info, from_spec, load_model
from .timm_loader import KEY_MAPS, map_efficientnet_pytorch, read_state_dict, register_key_map

__all__ = [
    "FAMILIES",
    "KEY_MAPS",
    "Family",
    "build_model_info",
    "LoadedModel",
    "ModelInfo",
    "from_spec",
    "group_param_names",
    "known_aliases",
    "load_imagenet_efficientnet_lite0",
    "load_model",
    "map_efficientnet_pytorch",
    "read_state_dict",
    "register_key_map",
]
