"""`lora`: low-rank adapters injected by the `peft` library; the new head trains in full.

We use peft rather than our own LoRA layers so the saved adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) also loads with
plain ``peft.PeftModel.from_pretrained`` on the same base, and so DoRA, rsLoRA and
LoRA on convolutions come with it. Targets are resolved here to explicit module names
(suffixes, a regex, or ``all-linear``), so a target that matches nothing is our error
with the real module names, and modules the task never calls (``Family.unused``) are
left out.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import Field, model_validator
from torch import nn

from ..errors import TuneforgeError
from ..models.info import _lora_capable, unused_modules
from .options import NAME_DOC, StrategyOptions
from .base import EfficientStrategy, module_listing, register


class LoraOptions(StrategyOptions):
    """Low-rank adapters (via peft) on the family's attention/MLP projections (or `targets` / `target_regex`); the head trains in full. DoRA and rsLoRA are options; 1x1 and regular convolutions of CNNs work too. The saved adapter loads with plain peft; output.merge folds it into the weights."""

    name: str = Field("lora", description=NAME_DOC)
    rank: int = Field(8, ge=1, description="LoRA rank r (size of the low-rank update).")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator: updates are scaled by alpha/rank (LoRA paper, section 4.1).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input path.")
    targets: Optional[Union[Literal["all-linear"], list[str]]] = Field(
        None, description="Module-name suffixes to adapt, or all-linear (every Linear layer of the backbone; 1x1 convolutions for CNNs); default: the model family's attention/MLP projections.")
    target_regex: Optional[str] = Field(None, description=r"Python regex that whole backbone module names must match (re.fullmatch), e.g. 'encoder\.layer\.[3-5]\.attention\.self\.value'; instead of targets.")
    dora: bool = Field(False, description="DoRA: learn each weight's magnitude separately from its LoRA-updated direction (Liu et al. 2024); slower, often better at low rank.")
    rslora: bool = Field(False, description="rsLoRA: scale updates by alpha/sqrt(rank) instead of alpha/rank, which keeps high ranks learning (Kalajdzievski 2023).")

    @model_validator(mode="after")
    def _one_target_rule(self) -> "LoraOptions":
        if self.targets is not None and self.target_regex is not None:
            raise ValueError("set either strategy.targets or strategy.target_regex, not both")
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as err:
                raise ValueError(f"strategy.target_regex is not a valid regular expression ({err})") from None
        return self


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):  # a 1x1 convolution is a linear map over channels
        return module.kernel_size == (1, 1) and module.groups == 1
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def resolve_lora_targets(backbone: nn.Module, info, options) -> list[str]:
    """Full backbone module names to adapt; errors list the names that exist."""
    skip = unused_modules(backbone, info.family)
    modules = [(n, m) for n, m in backbone.named_modules()
               if n and not any(n == u or n.startswith(u + ".") for u in skip)]
    if options.target_regex is not None:
        matched = [n for n, m in modules if re.fullmatch(options.target_regex, n)]
        what = f"strategy.target_regex {options.target_regex!r}"
    elif options.targets == "all-linear":
        matched = [n for n, m in modules if _linear_like(m)]
        what = "strategy.targets all-linear"
    else:
        targets = options.targets or info.lora_targets
        matched = [n for n, m in modules if any(n == t or n.endswith("." + t) for t in targets)]
        what = f"strategy.targets {targets}"
    if not matched:
        raise TuneforgeError(f"{what} match no module of this {info.family} model; its modules are: "
                             f"{module_listing(backbone, 16)} — set strategy.targets to suffixes of those names "
                             "(or strategy.target_regex)")
    table = dict(modules)
    unsupported = [f"{n} ({type(table[n]).__name__})" for n in matched if not _lora_capable(table[n])]
    if unsupported:
        raise TuneforgeError(f"{what} matches modules LoRA cannot adapt: {', '.join(unsupported[:5])}; LoRA adapts "
                             "Linear, Conv1D and non-grouped Conv2d layers — narrow the targets to those")
    dynamic = [n for n in matched if _dynamic_padding(table[n])]
    if dynamic:
        raise TuneforgeError(f"{what} matches convolutions with TF-style 'same' padding computed at run time "
                             f"({', '.join(dynamic[:5])}): peft's LoRA branch would pad them differently from the "
                             "base conv; leave them out of the targets (1x1 and ordinary convs work)")
    return matched


def _dynamic_padding(module: nn.Module) -> bool:
    # timm's Conv2dSame pads in forward(); the LoRA conv copies only the static padding
    return (isinstance(module, nn.Conv2d) and type(module).forward is not nn.Conv2d.forward
            and module.kernel_size != (1, 1))


@register("lora", LoraOptions)
class Lora(EfficientStrategy):
    saved_layout = "peft"
    mergeable = True
    plain_export = True  # after the merge, the base architecture with other weights
    shares_base = True  # several adapters on one base in `tuneforge serve --adapter`
    quantized_base = True  # QLoRA: adapters on a frozen 4-bit base

    def apply(self, model: nn.Module, info) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        matched = resolve_lora_targets(model.backbone, info, self.options)
        config = LoraConfig(
            r=self.options.rank,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            use_dora=self.options.dora,
            use_rslora=self.options.rslora,
            target_modules=[f"backbone.{n}" for n in matched],
            modules_to_save=["task_head"],
        )
        self.adapted = matched
        return get_peft_model(model, config)
