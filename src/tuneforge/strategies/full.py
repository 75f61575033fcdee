"""`full`: every parameter trains (the classic fine-tune, with a low learning rate)."""

from pydantic import Field

from ..recipe import NAME_DOC, StrategyOptions
from .base import FreezingStrategy, register


class FullOptions(StrategyOptions):
    name: str = Field("full", description=NAME_DOC)


@register("full", FullOptions)
class Full(FreezingStrategy):
    pass
