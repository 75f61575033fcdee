"""`ia3`: learned rescaling vectors (IA3, Liu et al. 2022), injected by `peft`.

IA3 multiplies the outputs of the key and value projections, and the input of each MLP's
output projection, by learned vectors initialised to ones (so step 0 equals the base
model). Which modules those are is a per-family fact (``Family.ia3_targets`` and
``Family.mlp_out`` in ``models/info.py``). The vectors fold into the base weights
exactly (``output.merge``), and the saved adapter loads with plain peft.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field
from torch import nn

from ..errors import TuneforgeError
from ..models.info import ia3_points
from .options import NAME_DOC, StrategyOptions
from .base import EfficientStrategy, module_listing, register


class Ia3Options(StrategyOptions):
    """IA3 (via peft): learned vectors rescale keys, values and the MLP's inner activations; about 0.01-0.1% of the parameters train, plus the head. Folds into the weights with output.merge."""

    name: str = Field("ia3", description=NAME_DOC)
    targets: Optional[list[str]] = Field(None, description="Module-name suffixes to rescale; default: the family's key/value projections and MLP output projections.")
    feedforward: Optional[list[str]] = Field(None, description="Suffixes (among targets) whose input rather than output is rescaled; default: the family's MLP output projections.")


def _suffix_hits(names: list[str], suffixes: list[str]) -> list[str]:
    return [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]


@register("ia3", Ia3Options)
class Ia3(EfficientStrategy):
    saved_layout = "peft"
    mergeable = True
    plain_export = True  # after the merge, the base architecture with other weights

    def apply(self, model: nn.Module, info) -> nn.Module:
        from peft import IA3Config, get_peft_model

        backbone = model.backbone
        targets, feedforward = ia3_points(backbone, info.family)
        names = [n for n, _ in backbone.named_modules() if n]
        if self.options.targets:
            targets = _suffix_hits(names, self.options.targets)
            feedforward = [t for t in targets if t in feedforward]
        if self.options.feedforward is not None:
            feedforward = _suffix_hits(targets, self.options.feedforward)
        if not targets:
            wanted = f"strategy.targets {self.options.targets}" if self.options.targets else \
                f"the default IA3 targets of the '{info.family}' family"
            raise TuneforgeError(f"{wanted} match no module of this model; its modules are: {module_listing(backbone)} "
                                 "— set strategy.targets to suffixes of those names (add the family's ia3_targets "
                                 "to tuneforge/models/info.py)")
        config = IA3Config(target_modules=[f"backbone.{n}" for n in targets],
                           feedforward_modules=[f"backbone.{n}" for n in feedforward],
                           modules_to_save=["task_head"])
        self.adapted = targets
        return get_peft_model(model, config)
