"""`partial`: freeze the lower layer groups, train the top `layers` groups and the head."""

from pydantic import Field

from ..errors import TuneforgeError
from .options import NAME_DOC, StrategyOptions
from .base import FreezingStrategy, register


class PartialOptions(StrategyOptions):
    """The lower layer groups stay frozen; the top `layers` groups and the head train."""

    name: str = Field("partial", description=NAME_DOC)
    layers: int = Field(2, ge=1, description="Number of top layer groups that train (the rest of the backbone is frozen).")


@register("partial", PartialOptions)
class Partial(FreezingStrategy):
    frozen_scope = "prefix"  # the lower groups (self.frozen) are a fixed function: the prefix cache applies

    def frozen_groups(self, groups):
        k = self.options.layers
        if k > len(groups):
            raise TuneforgeError(
                f"strategy.layers is {k} but this model has {len(groups)} layer groups; "
                f"set strategy.layers between 1 and {len(groups)} (or use strategy.name: full)"
            )
        return list(groups[: len(groups) - k])
