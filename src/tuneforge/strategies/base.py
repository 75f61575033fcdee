"""The strategy interface and the helpers every strategy shares.

The model a strategy sees is a task's ``Classifier``: ``model.backbone`` (the
pretrained network) and ``model.task_head`` (new for this task; a name no backbone uses, since
peft matches modules_to_save by suffix and timm models have `head`, `conv_head`). ``ModelInfo``
layer groups name backbone sub-modules from stem to top, so freezing, learning
rates and (later) layer-wise decay work by group, never by architecture.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

registry: dict[str, tuple[type, type]] = {}


def register(name: str, options_cls: type):
    """Class decorator: ``@register("lora", LoraOptions)``."""

    def wrap(cls):
        registry[name] = (options_cls, cls)
        cls.name = name
        return cls

    return wrap


class Strategy(Protocol):
    name: str

    def apply(self, model: nn.Module, info) -> nn.Module:
        """Freeze / inject / wrap. Returns the model to train (may be a wrapper)."""

    def param_groups(self, model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups (each with its own lr)."""

    def set_train_mode(self, model: nn.Module) -> None:
        """``model.train()``, keeping frozen parts in eval mode (BatchNorm statistics, dropout)."""


# --------------------------------------------------------------------------- shared helpers

def backbone_groups(info) -> list[list[str]]:
    """Layer groups as module names of the Classifier (prefix ``backbone.``)."""
    return [[f"backbone.{name}" if name else "backbone" for name in group] for group in info.layer_groups]


def modules_of(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules among ``names`` (a group may also list bare parameters, e.g. ViT's cls_token)."""
    table = dict(model.named_modules())
    return [table[n] for n in names if n in table]


def params_of(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out = []
    for n in names:
        out.extend(modules[n].parameters() if n in modules else [params[n]])
    return out


def freeze(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and normalisation scales are not decayed (BERT, timm convention).
    return p.ndim <= 1 or name.endswith(".bias")


def split_decay(named: list[tuple[str, torch.Tensor]], lr: float, weight_decay: float, tag: str) -> list[dict]:
    decay = [p for n, p in named if p.requires_grad and not _no_decay(n, p)]
    plain = [p for n, p in named if p.requires_grad and _no_decay(n, p)]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{tag}"})
    if plain:
        groups.append({"params": plain, "lr": lr, "weight_decay": 0.0, "name": f"{tag}.no_decay"})
    return groups


def head_and_body_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float,
                         is_head=lambda name: name.startswith("task_head.")) -> list[dict]:
    named = list(model.named_parameters())
    head = [(n, p) for n, p in named if is_head(n)]
    body = [(n, p) for n, p in named if not is_head(n)]
    return split_decay(body, lr, weight_decay, "backbone") + split_decay(head, head_lr, weight_decay, "head")


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_params(model)
    pct = 100.0 * trainable / max(total, 1)
    return f"trainable {trainable:,} of {total:,} parameters ({pct:.2f}%)"


class FreezingStrategy:
    """Shared by full / linear-probe / partial: freeze some backbone groups, train the rest."""

    name = "base"

    def __init__(self, options):
        self.options = options
        self.frozen: list[str] = []

    def frozen_groups(self, groups: list[list[str]]) -> list[list[str]]:
        return []

    def apply(self, model: nn.Module, info) -> nn.Module:
        groups = backbone_groups(info)
        frozen = self.frozen_groups(groups)
        self.frozen = [name for group in frozen for name in group]
        freeze(params_of(model, self.frozen))
        self.adapted = ["task_head"] + [n for g in groups if g not in frozen for n in g]
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        # Frozen blocks stay in eval mode: their BatchNorm statistics must not drift
        # (fastai's freeze, timm's freeze_batch_norm_2d) and their outputs become
        # deterministic, which later allows caching their activations.
        for module in modules_of(model, self.frozen):
            module.eval()

    def param_groups(self, model, lr, head_lr, weight_decay):
        return head_and_body_groups(model, lr, head_lr, weight_decay)


# --------------------------------------------------------------------------- parameter-efficient strategies

def is_head_param(name: str) -> bool:
    """The task head, plain (``task_head.``) or as peft's modules_to_save copy (``....task_head....``)."""
    return name.startswith("task_head.") or ".task_head." in name


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put BatchNorm layers whose scale is frozen into eval mode: a frozen backbone's running
    statistics are part of its weights (and small data would corrupt them)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.weight is None or not module.weight.requires_grad):
            module.eval()


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a parameter-efficient run must save: the parameters that train, by name."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def module_listing(backbone: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in backbone.named_modules() if n]
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


class EfficientStrategy:
    """Shared by the parameter-efficient strategies (adapters, bitfit, ia3, prompt and prefix
    tuning): the backbone stays frozen except what the strategy adds or selects; that part
    trains at ``train.lr`` and the new head at ``train.head_lr``.

    ``save_layout``: ``"trainable"`` saves only the trained tensors next to a reference to the
    base model (the run reloads by rebuilding the base and re-applying the strategy);
    ``"peft"`` saves a peft adapter directory. ``mergeable``: the update folds into the base
    weights (``output.merge``). ``max_text_tokens``: set when the strategy uses up position
    embeddings of the backbone (virtual tokens), so the task shortens its texts.
    """

    name = "base"
    save_layout = "trainable"
    mergeable = False
    max_text_tokens: int | None = None

    def __init__(self, options):
        self.options = options
        self.adapted: list[str] = []

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        freeze_norm_statistics(model)

    def param_groups(self, model, lr, head_lr, weight_decay):
        return head_and_body_groups(model, lr, head_lr, weight_decay, is_head=is_head_param)
