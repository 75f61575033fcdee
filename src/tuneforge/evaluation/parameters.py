"""What trained, counted for the manifest and the report: per module group and per module.

A model's parameters are named through wrappers (peft's ``base_model.model.``, compile's
``_orig_mod.``) down to single tensors, a couple of hundred of them for a small Transformer;
one row per tensor made a report 9,000 px tall. The summary has one row per layer group of
the model's ``ModelInfo`` (stem -> top, the same groups that set learning rates), the head and
anything else; the detail has one row per module that holds parameters (a linear layer's
weight and bias together), shown collapsed in the report.
"""

from __future__ import annotations

import re

_WRAPPERS = re.compile(r"(^|\.)(base_model\.model|_orig_mod)(?=\.)")
_ADAPTER_TAGS = ("lora_", "adapter_", "prompt_")  # declared adapter prefixes (strategies/)


def _plain(name: str) -> str:
    """``base_model.model.backbone.x.weight`` -> ``backbone.x.weight``."""
    return _WRAPPERS.sub("", name).lstrip(".")


def parameter_summary(model, layer_groups: list[list[str]] | None = None) -> dict:
    """Trainable / total parameters; ``groups``: per layer group, head and the rest; ``modules``:
    per module holding parameters; ``adapter_params``: those under an adapter prefix."""
    from ..strategies.base import backbone_path, group_finder, is_head

    find = group_finder(layer_groups) if layer_groups else None
    groups: dict[str, list[int]] = {}
    modules: dict[str, list[int]] = {}
    adapters = 0
    for name, p in model.named_parameters():
        n, trains = p.numel(), int(p.requires_grad) * p.numel()
        plain = _plain(name)
        path = backbone_path(plain)
        if is_head(plain):
            group = "head"
        elif path is None:
            group = plain.split(".")[0]  # outside the backbone: a prompt encoder, an LM head
        elif find is not None and find(path) is not None:
            i = find(path)
            first = layer_groups[i][0] or "backbone"
            group = f"{i}: {first}" + (f" (+{len(layer_groups[i]) - 1})" if len(layer_groups[i]) > 1 else "")
        else:
            group = "backbone: " + path.split(".")[0]
        for table, key in ((groups, group), (modules, plain.rpartition(".")[0] or plain)):
            row = table.setdefault(key, [0, 0])
            row[0] += n
            row[1] += trains
        if any(tag in name for tag in _ADAPTER_TAGS):
            adapters += n
    return {"total": sum(r[0] for r in modules.values()), "trainable": sum(r[1] for r in modules.values()),
            "adapter_params": adapters,
            "groups": [{"group": k, "params": v[0], "trainable": v[1]} for k, v in groups.items()],
            "modules": [{"module": k, "params": v[0], "trainable": v[1]} for k, v in modules.items()]}
