"""`bitfit`: only the bias terms of the backbone train, plus the new head (BitFit, Ben Zaken et al. 2022).

About 0.1% of a Transformer's parameters; every bias trains (attention, MLP, LayerNorm,
BatchNorm shifts), the weights stay bit-identical. Modules the task never calls
(``Family.unused``, e.g. BERT's pooler) stay frozen, so the reported trainable count is
what actually changes.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from ..errors import TuneforgeError
from ..models.info import unused_modules
from .options import NAME_DOC, StrategyOptions
from .base import EfficientStrategy, register


class BitFitOptions(StrategyOptions):
    """Only the backbone's bias terms (and the head) train; all weights stay frozen. Tiny to save, a good baseline with little data."""

    name: str = Field("bitfit", description=NAME_DOC)


@register("bitfit", BitFitOptions)
class BitFit(EfficientStrategy):
    plain_export = True  # only existing biases change: the base architecture exports as is

    def apply(self, model: nn.Module, info) -> nn.Module:
        unused = unused_modules(model.backbone, info.family)
        biases = []
        for name, param in model.backbone.named_parameters():
            keep = name.endswith("bias") and not any(name.startswith(u + ".") for u in unused)
            param.requires_grad_(keep)
            if keep:
                biases.append(name)
        if not biases:
            raise TuneforgeError(f"strategy bitfit: this {info.family} backbone has no bias parameters to train; "
                                 "use strategy.name: lora, ia3 or linear-probe")
        self.adapted = ["task_head"] + [b.removesuffix(".bias") for b in biases]
        return model
