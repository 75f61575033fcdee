"""Device and mixed-precision choice.

``auto`` picks bf16 autocast wherever the hardware runs bf16 natively: CUDA
GPUs with bf16 support, and CPUs with AVX-512 BF16 or AMX, where a bf16
matmul runs several times faster than fp32. Master weights and the optimizer
stay fp32; losses are computed in fp32.
"""

from __future__ import annotations

import torch

from ..errors import TuneforgeError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TuneforgeError(f"train.device is '{name}' but no CUDA GPU is visible; set train.device: cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TuneforgeError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None


def channels_last_images(batch: dict) -> dict:
    """A Trainer ``prepare_batch``: images in channels-last (NHWC) memory layout, to meet weights
    converted with ``model.to(memory_format=torch.channels_last)`` (train.channels_last)."""
    if "pixel_values" in batch:
        batch = {**batch, "pixel_values": batch["pixel_values"].contiguous(memory_format=torch.channels_last)}
    return batch


def cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise TuneforgeError("train.precision fp16 needs a CUDA GPU; on CPU use bf16 (or auto / fp32)")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TuneforgeError("this GPU has no bf16 support; set train.precision: fp16 or fp32")
        return torch.bfloat16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def has_depthwise_conv(model: torch.nn.Module) -> bool:
    """True when the model has a depthwise convolution (one filter per input channel).

    On CPU these run slower in bf16 than in fp32 (oneDNN has no fast bf16 depthwise path
    there): one training step at 64 px, batch 32, on the project's AMX machine took
    EfficientNet-Lite0 443 vs 316 ms, MobileNetV3-S 222 vs 102, ConvNeXt-atto 148 vs 132 in
    bf16 vs fp32, while ResNet-18 (dense convolutions, 179 vs 230) and ViT-Tiny (911 vs
    1698) gain from bf16. So ``precision: auto`` keeps such models in fp32 on CPU.
    """
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
