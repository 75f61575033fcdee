"""`adapters`: bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), our own code.

An adapter is ``h + up(relu(down(h)))`` with ``down: d -> d / reduction_factor`` and
``up`` zero-initialised, so at step 0 it adds exactly 0 and the model's outputs are
bit-identical to the base model's. Houlsby places one after each block's attention-output
projection and one after its MLP-output projection (before the residual add and norm);
Pfeiffer only after the MLP output. Where those projections are is a per-family fact
(``Family.attn_out`` / ``mlp_out`` in ``models/info.py``); here we only attach.

Written here rather than taken from a library: AdapterHub's ``adapters`` package lags
behind current Transformers, and the mechanism is a few lines. Each adapter is a child
module named ``adapter`` of the projection it follows, run by a forward hook, so the base
weights keep their names (and checkpoints of the base still load) while the adapter's
parameters share the ``.adapter.`` name component.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import TuneforgeError
from ..models.info import FAMILIES, adapter_points
from .options import NAME_DOC, StrategyOptions
from .base import EfficientStrategy, register


class AdapterOptions(StrategyOptions):
    """Bottleneck adapters after the attention and MLP outputs of each block (Houlsby) or the MLP outputs only (Pfeiffer), zero-initialised so training starts from the base model's outputs; backbone frozen, head trains."""

    name: str = Field("adapters", description=NAME_DOC)
    style: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: adapters after each block's attention output and MLP output; pfeiffer: after the MLP output only (half the parameters). CNNs have no attention: use pfeiffer.")
    reduction_factor: int = Field(16, ge=1, description="Bottleneck width = hidden size / reduction_factor (16 -> 384-d MiniLM gets 24-d adapters).")


class BottleneckAdapter(nn.Module):
    """``h + up(relu(down(h)))`` over the feature dimension (dim 1 for conv feature maps)."""

    def __init__(self, dim: int, reduction_factor: int, channels_first: bool = False):
        super().__init__()
        hidden = max(1, dim // reduction_factor)
        self.channels_first = channels_first
        self.down = nn.Linear(dim, hidden)  # default (Kaiming-uniform) init: gradients reach `up` from step 1
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)  # zero update at step 0 (as LoRA's B); Houlsby §3.1 near-identity init
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.movedim(1, -1) if self.channels_first else h  # (B, C, H, W) -> (B, H, W, C)
        delta = self.up(torch.relu(self.down(x)))
        return h + (delta.movedim(-1, 1) if self.channels_first else delta)


def _run_adapter(module: nn.Module, args, output):
    # forward hook: the projection's output passes through its adapter child
    return module.adapter(output)


def _output_features(module: nn.Module) -> tuple[int, bool]:
    """(feature size of the module's output, whether features are on dim 1)."""
    if isinstance(module, nn.Linear):
        return module.out_features, False
    if isinstance(module, nn.Conv2d):
        return module.out_channels, True
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
        return int(module.nf), False
    raise TuneforgeError(f"cannot place an adapter after a {type(module).__name__}: adapters follow Linear/Conv "
                         "projections (check attn_out/mlp_out of this family in tuneforge/models/info.py)")


@register("adapters", AdapterOptions)
class Adapters(EfficientStrategy):
    def apply(self, model: nn.Module, info) -> nn.Module:
        style = self.options.style
        points = adapter_points(model.backbone, info.family)
        if info.family not in FAMILIES or not points["mlp"]:
            raise TuneforgeError(
                f"strategy adapters: no adapter positions are known for the '{info.family}' family (add its "
                "attention/MLP output module names, attn_out/mlp_out, to FAMILIES in tuneforge/models/info.py); "
                f"known families: {', '.join(f for f, m in FAMILIES.items() if m.mlp_out)} — or use lora / bitfit")
        if style == "houlsby" and not points["attention"]:
            raise TuneforgeError(f"strategy.style houlsby puts adapters after attention outputs, but this "
                                 f"{info.family} model has none (a CNN); set strategy.style: pfeiffer")
        names = points["mlp"] + (points["attention"] if style == "houlsby" else [])
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        table = dict(model.backbone.named_modules())
        for name in sorted(names):
            target = table[name]
            dim, channels_first = _output_features(target)
            weight = next(target.parameters())
            target.adapter = BottleneckAdapter(dim, self.options.reduction_factor, channels_first).to(weight.device)
            target.register_forward_hook(_run_adapter)
        self.adapted = sorted(names)
        return model
