"""`linear-probe`: the backbone is a frozen feature extractor; only the head trains."""

from pydantic import Field

from .options import NAME_DOC, StrategyOptions
from .base import FreezingStrategy, register


class LinearProbeOptions(StrategyOptions):
    """The backbone is a frozen feature extractor (BatchNorm statistics and dropout frozen too); only the head trains. Fast, small to save, good with little data."""

    name: str = Field("linear-probe", description=NAME_DOC)


@register("linear-probe", LinearProbeOptions)
class LinearProbe(FreezingStrategy):
    frozen_scope = "backbone"  # the pooled features are a fixed function: the activation cache applies
    needs_task_head = True
    # the backbone is the pretrained one, bit for bit: save the head and a reference to the base
    # (a few KB for MiniLM's 770 trained parameters instead of its 91 MB), as the PEFT strategies do
    saved_layout = "trainable"

    def frozen_groups(self, groups):
        return list(groups)
