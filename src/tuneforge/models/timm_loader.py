"""Build a timm image backbone and fill it from a local weights file.

The model is created with ``num_classes=0`` so ``forward(x)`` returns pooled
features ``(B, num_features)``; the task adds its own head. We never let timm
download: weights come only from ``model.weights``.

Key maps
--------
A checkpoint saved by another codebase has other key names. ``key_map`` turns
the file's state dict into timm's before loading; it may be

* a callable ``(state_dict, model) -> state_dict``;
* a registered name from ``KEY_MAPS`` (e.g. ``"efficientnet_pytorch"`` for files
  written by lukemelas' EfficientNet-PyTorch and its forks);
* ``"package.module:function"``, imported at load time (the function has the
  callable's signature), so a recipe can point at user code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from ..errors import TuneforgeError, suggest
from .info import (
    LoadedModel,
    ModelInfo,
    check_groups,
    cover_groups,
    lora_targets_for,
    timm_family,
    transformer_groups,
)

KeyMap = Callable[[dict, "object"], dict]  # (state_dict, model) -> state_dict

# Containers that training scripts wrap state dicts in (timm, torchvision, lightning-ish).
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


# ---------------------------------------------------------------------------
# reading weight files


def read_state_dict(path: str | Path) -> dict:
    """Tensors from ``.safetensors`` or ``.pth/.pt/.bin`` (unpickled with ``weights_only=True``)."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise TuneforgeError(f"weights file {path} does not exist; set model.weights to a local .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise TuneforgeError(f"weights file {path} has an unknown extension; use .safetensors, .pth, .pt or .bin")
    try:
        # weights_only=True: a .pth is a pickle, and an untrusted pickle can run code.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for corrupt zips
        raise TuneforgeError(
            f"could not read {path} as plain tensors ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "tuneforge only loads weights that need no code to unpickle; convert the file to .safetensors "
            "(safetensors.torch.save_file(state_dict, 'model.safetensors')) in a trusted environment"
        ) from e
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise TuneforgeError(f"{path} does not hold a state dict (name -> tensor); got {type(obj).__name__}")
    # DataParallel / DDP checkpoints prefix every key with "module."
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ---------------------------------------------------------------------------
# key maps


def map_efficientnet_pytorch(state_dict: dict, model) -> dict:
    """EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._bn1``, ``_fc``) -> timm EfficientNet.

    Both implementations register parameters in the same order (stem, blocks in
    order, each block expand -> depthwise -> [SE] -> project, head), so keys map
    by position; every pair is shape-checked and every key must be used.
    ``num_batches_tracked`` buffers are matched by their BatchNorm module, since
    some exports drop them. The source classifier ``_fc`` is used only when the
    model has a classifier.
    """
    target = model.state_dict()
    nbt = "num_batches_tracked"
    has_head = any(k.startswith(_classifier_name(model) + ".") for k in target)
    src_keys = [k for k in state_dict if not k.endswith(nbt) and (has_head or not k.startswith("_fc."))]
    tgt_keys = [k for k in target if not k.endswith(nbt)]
    if len(src_keys) != len(tgt_keys):
        raise TuneforgeError(
            f"key_map 'efficientnet_pytorch': the file has {len(src_keys)} tensors but timm "
            f"'{model.pretrained_cfg.get('architecture', type(model).__name__)}' expects {len(tgt_keys)}; "
            "the weights were saved from a different architecture — set model.name to the matching timm model"
        )
    out = {}
    for i, (s, t) in enumerate(zip(src_keys, tgt_keys)):
        if tuple(state_dict[s].shape) != tuple(target[t].shape):
            raise TuneforgeError(
                f"key_map 'efficientnet_pytorch': tensor #{i} '{s}' {tuple(state_dict[s].shape)} does not fit "
                f"timm '{t}' {tuple(target[t].shape)}; the file is not an efficientnet_pytorch checkpoint of this "
                "architecture — set model.name to the matching timm model"
            )
        out[t] = state_dict[s]
        if s.endswith(".running_mean") and t.endswith(".running_mean"):
            s_nbt, t_nbt = s[: -len("running_mean")] + nbt, t[: -len("running_mean")] + nbt
            if t_nbt in target:
                out[t_nbt] = state_dict.get(s_nbt, target[t_nbt])
    for t in target:  # BN counters absent on both sides of the zip keep the model's value
        out.setdefault(t, target[t])
    return out


KEY_MAPS: dict[str, KeyMap] = {"efficientnet_pytorch": map_efficientnet_pytorch}


def register_key_map(name: str, fn: KeyMap) -> None:
    """Make ``fn`` available as ``model.key_map: name``."""
    KEY_MAPS[name] = fn


def resolve_key_map(key_map: str | KeyMap) -> KeyMap:
    if callable(key_map):
        return key_map
    if ":" in key_map:
        module_name, _, attr = key_map.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise TuneforgeError(
                f"model.key_map '{key_map}' could not be imported ({e}); use 'package.module:function' "
                "with the module on PYTHONPATH"
            ) from e
        if not callable(fn):
            raise TuneforgeError(f"model.key_map '{key_map}' is not a function")
        return fn
    if key_map not in KEY_MAPS:
        raise TuneforgeError(
            f"unknown model.key_map '{key_map}'{suggest(key_map, KEY_MAPS)}; known: {', '.join(sorted(KEY_MAPS))}, "
            "or give 'package.module:function'"
        )
    return KEY_MAPS[key_map]


# ---------------------------------------------------------------------------
# loading


def _classifier_name(model) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"


def load_weights_into(model, state_dict: dict, *, origin: str) -> None:
    """Strictly load ``state_dict``, dropping only the original classifier head."""
    target = model.state_dict()
    head = _classifier_name(model)
    # The file's head was trained for its own classes (usually 1000); our model has
    # num_classes=0, so the task's fresh head replaces it.
    state_dict = {k: v for k, v in state_dict.items() if k in target or not k.startswith(head + ".")}
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(target[k].shape)}"
        for k in state_dict
        if k in target and tuple(state_dict[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:3])})")
        raise TuneforgeError(
            f"weights {origin} do not fit timm '{arch}': " + ", ".join(parts) + ". "
            "Check that model.name is the architecture the file was saved from; if the file uses another "
            f"codebase's key names, set model.key_map (known: {', '.join(sorted(KEY_MAPS))}, or 'module:function')"
        )
    model.load_state_dict(state_dict, strict=True)


def create_timm(arch: str, *, num_classes: int = 0):
    import timm

    try:
        # pretrained=False always: weights only ever come from a local file
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:  # timm raises RuntimeError("Unknown model (...)")
        hint = suggest(arch, timm.list_models())
        raise TuneforgeError(f"timm cannot build '{arch}'{hint}: {e}; set model.name to a timm architecture") from e


def load_timm(
    arch: str,
    *,
    weights: str | Path | None = None,
    key_map: str | KeyMap | None = None,
    pretrained: bool = True,
    label: str | None = None,
    state_dict: dict | None = None,
) -> LoadedModel:
    """A timm backbone (``num_classes=0``) with weights from ``weights`` or ``state_dict``.

    ``pretrained=False`` gives random init and ignores weights entirely (rebuilding a
    fine-tuned run's architecture).
    """
    model = create_timm(arch)
    if pretrained:
        if state_dict is None:
            if weights is None:
                raise TuneforgeError(
                    f"'{arch}' is a timm architecture but no weights were given and tuneforge never downloads: "
                    "set model.weights to a local .safetensors/.pth file of this architecture"
                )
            state_dict = read_state_dict(weights)
        if key_map is not None:
            state_dict = resolve_key_map(key_map)(state_dict, model)
        load_weights_into(model, state_dict, origin=str(weights) if weights else f"for {arch}")
    model.eval()
    src = label or (f"timm:{arch} + {weights}" if pretrained and weights else f"timm:{arch} (random init)")
    return LoadedModel(backbone=model, info=timm_info(model, arch, src), tokenizer=None)


def timm_info(model, arch: str, source: str, family: str | None = None) -> ModelInfo:
    from timm.data import resolve_data_config
    from timm.models import group_parameters

    try:
        # group_matcher(coarse=True): stem, one group per stage, final conv/norm merged
        # into the last stage (timm's MATCH_PREV_GROUP); unmatched params land on top.
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        group_of = {n: i for i, key in enumerate(sorted(grouped)) for n in grouped[key]}
        groups = cover_groups(model, group_of)
    except (AttributeError, NotImplementedError):  # a model without timm's grouping metadata
        groups = transformer_groups(model)
    check_groups(model, groups)
    family = family or timm_family(model)
    cfg = resolve_data_config({}, model=model)
    pre = {
        "input_size": [int(x) for x in cfg["input_size"]],
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }
    return ModelInfo(
        family=family,
        modality="image",
        layer_groups=groups,
        feature_dim=int(model.num_features),
        lora_targets=lora_targets_for(model, family, groups),
        source=source,
        preprocessing=pre,
        spec={"kind": "timm", "arch": arch},
    )


__all__ = ["KEY_MAPS", "load_timm", "map_efficientnet_pytorch", "read_state_dict", "register_key_map"]
