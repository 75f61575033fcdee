"""`full`: every parameter trains (the classic fine-tune, with a low learning rate)."""

from pydantic import Field

from .options import NAME_DOC, StrategyOptions
from .base import FreezingStrategy, register


class FullOptions(StrategyOptions):
    """Every parameter trains, backbone at `train.lr`, head at `train.head_lr`. Best accuracy with enough data; the most memory."""

    name: str = Field("full", description=NAME_DOC)


@register("full", FullOptions)
class Full(FreezingStrategy):
    pass
