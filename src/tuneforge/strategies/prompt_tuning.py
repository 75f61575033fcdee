"""`prompt-tuning`: learned virtual-token embeddings prepended to the text (Lester et al. 2021), via `peft`.

The backbone is wrapped by peft's feature-extraction prompt-learning model, which
prepends the virtual tokens' embeddings and extends the attention mask with ones for
them (every real token attends to the prompt; padding stays masked). We then drop the
virtual positions from the hidden states, so the task pools over the real tokens with
its own mask and ``cls`` pooling still reads the real [CLS] token.

What holds at step 0: unlike zero-initialised adapters, a prompt changes the outputs
from the start (real tokens attend to it); with the prompt disabled the model is the
base model exactly, and a text's prediction does not depend on the padding around it.
The virtual tokens use up position embeddings, so texts are shortened to fit
(``max_text_tokens``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from ..errors import TuneforgeError
from ..modalities import modality_of
from .options import NAME_DOC, StrategyOptions
from .base import EfficientStrategy, register


class PromptTuningOptions(StrategyOptions):
    """Learned virtual-token embeddings (via peft) prepended to every text; the backbone is frozen and the head trains. Text Transformers only. Use a high train.lr (e.g. 3e-2)."""

    name: str = Field("prompt-tuning", description=NAME_DOC)
    modalities: ClassVar[tuple[str, ...]] = ("text",)
    virtual_tokens: int = Field(20, ge=1, le=256, description="Number of learned virtual tokens prepended to each text.")
    init: Literal["sample-vocab", "random"] = Field("sample-vocab", description="Start the prompt from embeddings of randomly sampled vocabulary tokens, or from random vectors.")


class PromptedBackbone(nn.Module):
    """A peft prompt-learning model around a Hugging Face backbone that returns the hidden
    states of the real tokens only (``strip`` leading virtual positions removed)."""

    def __init__(self, peft_model: nn.Module, strip: int):
        super().__init__()
        self.peft = peft_model
        self.strip = strip

    def forward(self, input_ids=None, attention_mask=None, **_):
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state[:, self.strip:]  # (B, T, H): virtual tokens dropped
        return SimpleNamespace(last_hidden_state=hidden)


def wrap_prompt_learning(strategy, model: nn.Module, info, config, strip: int) -> nn.Module:
    """Shared by prompt and prefix tuning: check the backbone, wrap it, reserve positions."""
    from peft import get_peft_model

    name = strategy.name
    if not modality_of(info.modality).tokenized or info.spec.get("kind") != "hf":
        raise TuneforgeError(f"strategy {name} adds virtual tokens to a Transformer's text input; "
                             f"'{info.source}' is an {info.modality} model ({info.family}) — use lora, adapters, "
                             "ia3 or bitfit for image models")
    positions = getattr(model.backbone.config, "max_position_embeddings", None)
    n = config.num_virtual_tokens
    if positions is not None:
        if positions - n < 8:
            raise TuneforgeError(f"strategy.virtual_tokens {n} leaves no room for text in this model's "
                                 f"{positions} positions; lower strategy.virtual_tokens")
        strategy.max_text_tokens = positions - n
    model.backbone = PromptedBackbone(get_peft_model(model.backbone, config), strip)
    strategy.adapted = [f"{n} virtual tokens"]
    return model


@register("prompt-tuning", PromptTuningOptions)
class PromptTuning(EfficientStrategy):
    adds_virtual_tokens = True

    def apply(self, model: nn.Module, info) -> nn.Module:
        from peft import PromptTuningConfig, PromptTuningInit

        init = PromptTuningInit.SAMPLE_VOCAB if self.options.init == "sample-vocab" else PromptTuningInit.RANDOM
        config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.options.virtual_tokens,
                                    prompt_tuning_init=init)
        return wrap_prompt_learning(self, model, info, config, strip=self.options.virtual_tokens)
