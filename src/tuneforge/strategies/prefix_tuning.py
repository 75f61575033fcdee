"""`prefix-tuning`: learned key/value prefixes in every attention layer (Li & Liang 2021), via `peft`.

peft passes the prefixes as past key/values and extends the attention mask with ones for
them; the hidden states keep the text's own length, so the task's mask and pooling apply
unchanged. Step 0 differs from the base model (attention sees the prefixes); with the
prefix disabled it is the base model exactly. The prefixes occupy the first positions.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from .options import NAME_DOC, StrategyOptions
from .base import EfficientStrategy, register
from .prompt_tuning import wrap_prompt_learning


class PrefixTuningOptions(StrategyOptions):
    """Learned key/value prefixes (via peft) in every attention layer; the backbone is frozen and the head trains. Text Transformers only."""

    name: str = Field("prefix-tuning", description=NAME_DOC)
    modalities: ClassVar[tuple[str, ...]] = ("text",)
    virtual_tokens: int = Field(20, ge=1, le=256, description="Length of the learned prefix in each attention layer.")
    projection: bool = Field(False, description="Reparameterise the prefix through a 2-layer MLP (the paper's trick for stabler training; more parameters while training).")


@register("prefix-tuning", PrefixTuningOptions)
class PrefixTuning(EfficientStrategy):
    adds_virtual_tokens = True

    def apply(self, model: nn.Module, info) -> nn.Module:
        from peft import PrefixTuningConfig

        config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.options.virtual_tokens,
                                    prefix_projection=self.options.projection)
        return wrap_prompt_learning(self, model, info, config, strip=0)
