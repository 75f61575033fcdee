"""`lora`: low-rank adapters injected by the `peft` library; the new head trains in full.

We use peft rather than our own LoRA layers so the saved adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) also loads with
plain ``peft.PeftModel.from_pretrained`` on the same base.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field
from torch import nn

from ..errors import TuneforgeError
from ..recipe import NAME_DOC, StrategyOptions
from .base import register


class LoraOptions(StrategyOptions):
    """Low-rank adapters (via peft) on the family's attention/MLP projections (or `targets`); the head trains in full. The saved adapter loads with plain peft too."""

    name: str = Field("lora", description=NAME_DOC)
    rank: int = Field(8, ge=1, description="LoRA rank r (size of the low-rank update).")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator: updates are scaled by alpha/rank (LoRA paper, section 4.1).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input path.")
    targets: Optional[list[str]] = Field(None, description="Module-name suffixes to adapt; default: the model family's attention/MLP projections.")


@register("lora", LoraOptions)
class Lora:
    def __init__(self, options: LoraOptions):
        self.options = options
        self.adapted: list[str] = []

    def apply(self, model: nn.Module, info) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = self.options.targets or info.lora_targets
        names = [n for n, _ in model.backbone.named_modules()]
        matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        if not matched:
            raise TuneforgeError(
                f"strategy.targets {targets} match no module of this {info.family} model; "
                f"module names look like: {', '.join(names[1:8])} ... — set strategy.targets to suffixes of those names"
            )
        config = LoraConfig(
            r=self.options.rank,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=[f"backbone.{n}" for n in matched],
            modules_to_save=["task_head"],
        )
        self.adapted = matched
        return get_peft_model(model, config)

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
