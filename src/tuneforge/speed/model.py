"""Speed-ups that change how the model computes: fast CPU dropout, channels-last, activation
checkpointing, torch.compile. Each acts on the model in place after the strategy is applied."""

from __future__ import annotations

import torch

from ..engine.precision import channels_last_images
from ..errors import TuneforgeError
from ..modalities import modality_of


class FastDropout:
    """``train.fast_dropout``: dropout masks from 16-bit random draws on CPU (``engine/fast_dropout.py``)."""

    name, stage = "fast dropout", "model"

    def __init__(self):
        self.model = None
        self.configs: list = []

    def applies(self, job) -> tuple[bool, str]:
        if not job.cfg.fast_dropout or job.device.type != "cpu":
            return False, ""
        if job.cfg.compile:
            return False, "train.compile is on (compiled graphs fuse torch's own dropout)"
        return True, ""

    def apply(self, job) -> None:
        from ..engine import fast_dropout

        self.model = job.model
        n = fast_dropout.install(job.model)
        attention = fast_dropout.install_attention(job.model)
        if n:
            job.log(f"dropout: {n} dropout layers" + (" and the attention probabilities" if attention else "")
                    + " draw their masks with the fast CPU kernel (train.fast_dropout)")

    def remove(self) -> None:
        from ..engine import fast_dropout

        if self.model is not None:
            fast_dropout.uninstall(self.model)
            for module in self.model.modules():
                config = getattr(module, "config", None)
                if getattr(config, "_attn_implementation", None) == fast_dropout.ATTENTION:
                    config._attn_implementation = "sdpa"
            self.model = None


class ChannelsLast:
    """``train.channels_last``: NHWC weights and images (faster convolutions on GPUs with bf16/fp16)."""

    name, stage = "channels-last", "model"

    def applies(self, job) -> tuple[bool, str]:
        choice = job.cfg.channels_last
        if not modality_of(job.task.modality).spatial or choice == "off":
            return False, ""
        return choice == "on" or job.device.type == "cuda", ""

    def apply(self, job) -> None:
        job.model.to(memory_format=torch.channels_last)  # 4-D weights only; the batches follow
        job.batch_layout = channels_last_images  # the Trainer's prepare_batch
        job.log("memory format: channels-last (train.channels_last)")

    def remove(self) -> None:
        pass  # the model is the run's own; nothing outside it changed


def _backbone(model):
    """The pretrained network inside the task's module, through a strategy's wrappers."""
    from ..strategies.base import base_module

    backbone = base_module(model).backbone
    backbone = getattr(backbone, "peft", backbone)  # prompt tuning wraps the HF model
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


class Checkpointing:
    """``train.gradient_checkpointing``: activations recomputed in the backward pass (less memory),
    through the backbone library's own switch. ``auto``: on only where memory is short
    (:func:`checkpointing_pays`), because where memory is plentiful it only costs time (measured
    on SmolLM2: the field's description in recipe.py)."""

    name, stage = "gradient checkpointing", "model"

    def __init__(self):
        self.why_on = ""

    def applies(self, job) -> tuple[bool, str]:
        choice = job.cfg.gradient_checkpointing
        if choice != "auto":
            return bool(choice), ""
        estimate = activation_bytes(job)
        if estimate is None:  # not a transformer whose shape we can read (images, custom modules): as before
            return False, ""
        free = free_memory(job.device)
        on, why = checkpointing_pays(estimate, free)
        self.why_on = why if on else ""
        # off without a word when the activations are small; a line when they are big enough to matter
        return on, ("" if on or estimate < 2**30 else why)

    def apply(self, job) -> None:
        enable_checkpointing(job.model, job.log, self.why_on)

    def remove(self) -> None:
        pass


# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.1:
# a transformer layer keeps about 34*s*b*h bytes of activations at 16 bits when attention is a
# fused kernel (SDPA; the 5*a*s^2*b term of materialised attention scores is gone). Twice that
# in fp32.
BYTES_PER_TOKEN_HIDDEN_LAYER_16BIT = 34
SHARE_OF_FREE_MEMORY = 0.25  # on when one micro-batch's activations would take more than this


def activation_bytes(job) -> int | None:
    """Estimated activation memory of one training micro-batch of the longest rows, or None
    where the model's shape is unknown (not a Hugging Face transformer with text inputs)."""
    if modality_of(job.task.modality).spatial:
        return None
    config = getattr(_backbone(job.model), "config", None)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model")
                   if isinstance(getattr(config, k, None), int)), None)
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(getattr(config, k, None), int)), None)
    length = getattr(job.task, "max_length", None)
    if not (hidden and layers and isinstance(length, int)):
        return None
    scale = 1 if job.amp_dtype is not None else 2
    return BYTES_PER_TOKEN_HIDDEN_LAYER_16BIT * scale * job.cfg.batch_size * length * hidden * layers


def free_memory(device) -> int | None:
    """Bytes free for this run: the GPU's free memory, or the machine's available RAM (Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def checkpointing_pays(estimate: int, free: int | None) -> tuple[bool, str]:
    """``auto``'s rule: on when one micro-batch's estimated activations exceed a quarter of the
    free memory (then they, with weights, gradients, optimizer state and the allocator's
    slack, risk running out); off otherwise, where recomputing only costs time."""
    gb = 2**30
    if free is None:
        return False, f"auto: ~{estimate / gb:.1f} GB of activations per micro-batch, free memory unknown"
    on = estimate > SHARE_OF_FREE_MEMORY * free
    return on, (f"auto: ~{estimate / gb:.1f} GB of activations per micro-batch (estimated), "
                f"{'more' if on else 'less'} than a quarter of the {free / gb:.1f} GB free")


def enable_checkpointing(model, log, why: str = "") -> None:
    backbone = _backbone(model)
    # Which switch a backbone has is the backbone library's interface (HF / timm), not ours to declare.
    if hasattr(backbone, "gradient_checkpointing_enable"):
        # non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA)
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)  # timm
    else:
        raise TuneforgeError(f"train.gradient_checkpointing: a {type(backbone).__name__} backbone has no checkpointing "
                             "switch (Hugging Face and timm models do); set train.gradient_checkpointing: false")
    log("gradient checkpointing: on (activations recomputed in the backward pass" + (f"; {why}" if why else "") + ")")


class Compile:
    """``train.compile``: the backbone compiled in place (``nn.Module.compile``): the module tree and
    its state_dict names stay as they are, so checkpoints, saving and strategies are unaffected."""

    name, stage = "torch.compile", "model"

    def applies(self, job) -> tuple[bool, str]:
        return job.cfg.compile, ""

    def apply(self, job) -> None:
        from ..strategies.base import base_module

        base = base_module(job.model)
        # Batches of varying length (text) compile once with dynamic shapes instead of once per length.
        base.backbone.compile(dynamic=modality_of(job.task.modality).variable_length)
        job.log("torch.compile: the backbone compiles on its first batches (train.compile)")

    def remove(self) -> None:
        pass
