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
    through the backbone library's own switch."""

    name, stage = "gradient checkpointing", "model"

    def applies(self, job) -> tuple[bool, str]:
        return job.cfg.gradient_checkpointing, ""

    def apply(self, job) -> None:
        enable_checkpointing(job.model, job.log)

    def remove(self) -> None:
        pass


def enable_checkpointing(model, log) -> None:
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
    log("gradient checkpointing: on (activations recomputed in the backward pass)")


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
