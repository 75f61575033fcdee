"""The strategy interface and the helpers every strategy shares.

The model a strategy sees is a task's ``Classifier``: ``model.backbone`` (the
pretrained network) and ``model.task_head`` (new for this task; a name no backbone uses, since
peft matches modules_to_save by suffix and timm models have `head`, `conv_head`). ``ModelInfo``
layer groups name backbone sub-modules from stem to top, so freezing, unfreezing
schedules, learning rates and layer-wise decay work by group, never by architecture.
Optimizer groups are built here for every strategy (``param_groups``), not per strategy.
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

    # Optional hooks (looked up with getattr; a strategy defines only what it needs):
    #   will_train(model) -> set[str]: parameter names the optimizer must hold from the start
    #       (default: those with requires_grad); gradual-unfreeze adds groups it unfreezes later.
    #   callbacks(plan, log) -> list[Callback]: events the strategy needs during training
    #       (plan: engine.plan.TrainPlan, the step counts, known before the Trainer is built).
    #   wrap_schedule(fn, plan) -> fn: reshape the lr multiplier (per-stage re-warmup).
    # Optimizer parameter groups (learning rates per layer group) are built for every
    # strategy by `param_groups` below, from ModelInfo layer groups, never per strategy.

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


def is_head(name: str) -> bool:
    # peft wraps the head as `base_model.model.task_head.modules_to_save.default.*`
    return name.startswith("task_head.") or ".task_head." in name


def _backbone_path(name: str) -> str | None:
    """``backbone.x.y`` (or peft's ``base_model.model.backbone.x.y``) -> ``x.y``; None outside the backbone."""
    if name.startswith("backbone."):
        return name[len("backbone."):]
    i = name.find(".backbone.")
    return name[i + len(".backbone."):] if i >= 0 else None


def group_finder(layer_groups: list[list[str]]):
    """A function from a backbone parameter path to its layer-group index (None if in no group).
    Injected parameters (``...query.lora_A.default.weight``) fall in the group of the module they sit in."""
    table = {entry: i for i, group in enumerate(layer_groups) for entry in group}

    def find(path: str) -> int | None:
        parts = path.split(".")
        for k in range(len(parts), 0, -1):
            i = table.get(".".join(parts[:k]))
            if i is not None:
                return i
        return table.get("")

    return find


def layer_lrs(n_groups: int, lr: float, layer_decay: float | None = None,
              lr_range: tuple[float, float] | None = None) -> list[float]:
    """Learning rate of each backbone layer group, stem (0) to top (n-1).

    ``layer_decay``: group i of n gets ``lr * decay**(n - i)``, the head ``decay**0`` (BEiT §2.4,
    timm's ``param_groups_layer_decay``). ``lr_range=(lo, hi)``: geometric from ``lo`` at the stem
    to ``hi`` at the top group, fastai's ``slice(lo, hi)``. Neither: every group at ``lr``.
    """
    if layer_decay is not None:
        return [lr * layer_decay ** (n_groups - i) for i in range(n_groups)]
    if lr_range is not None:
        lo, hi = lr_range
        if n_groups == 1:
            return [hi]
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    return [lr] * n_groups


def param_groups(model: nn.Module, info, train, will_train: set[str] | None = None) -> list[dict]:
    """Optimizer parameter groups for any strategy, from ModelInfo layer groups.

    Every trainable parameter (or every name in ``will_train``) lands in exactly one group:
    the head at ``train.head_lr``; backbone parameters (pretrained or injected adapters) at
    their layer group's rate (``layer_lrs``); biases and norms without weight decay. With one
    rate for the whole backbone the groups are ``backbone``/``head`` (fewer fused-AdamW calls).
    """
    names = will_train if will_train is not None else {n for n, p in model.named_parameters() if p.requires_grad}
    layer_decay, lr_range = getattr(train, "layer_decay", None), getattr(train, "lr_range", None)
    rates = layer_lrs(len(info.layer_groups), train.lr, layer_decay, lr_range)
    uniform = layer_decay is None and lr_range is None
    head_lr = train.head_lr or (lr_range[1] if lr_range else train.lr)
    find = group_finder(info.layer_groups)
    buckets: dict[str, tuple[float, list]] = {}
    for n, p in model.named_parameters():
        if n not in names:
            continue
        if is_head(n):
            tag, lr = "head", head_lr
        else:
            path = _backbone_path(n)
            i = find(path) if path is not None else None
            if uniform:
                tag, lr = "backbone", train.lr
            elif i is None:  # trainable but in no layer group (e.g. a prompt outside the backbone)
                tag, lr = "other", rates[-1]
            else:
                tag, lr = f"backbone.{i}", rates[i]
        buckets.setdefault(tag, (lr, []))[1].append((n, p))

    def order(tag: str) -> tuple:
        return (tag == "head", tag == "other", int(tag.split(".")[1]) if tag.startswith("backbone.") else -1)

    groups = []
    for tag in sorted(buckets, key=order):
        lr, named = buckets[tag]
        groups += _split(named, lr, train.weight_decay, tag)
    return groups


def _split(named, lr, weight_decay, tag) -> list[dict]:
    decay = [p for n, p in named if not _no_decay(n, p)]
    plain = [p for n, p in named if _no_decay(n, p)]
    return ([{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": tag}] if decay else []) + \
           ([{"params": plain, "lr": lr, "weight_decay": 0.0, "name": f"{tag}.no_decay"}] if plain else [])


def describe_lrs(groups: list[dict], info) -> str:
    """One line: each layer group's learning rate, named by its first module."""
    seen: dict[str, float] = {}
    for g in groups:
        seen.setdefault(g["name"].removesuffix(".no_decay"), g["lr"])
    parts = []
    for tag, lr in seen.items():
        if tag.startswith("backbone."):
            first = info.layer_groups[int(tag.split(".")[1])]
            tag = f"{tag.split('.')[1]}:{first[0]}{'+' if len(first) > 1 else ''}"
        parts.append(f"{tag} {lr:.3g}")
    return "learning rates: " + ", ".join(parts)


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
        self.adapted = [h for h in ("task_head", "lm_head") if hasattr(model, h)] + [n for g in groups if g not in frozen for n in g]
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        # Frozen blocks stay in eval mode: their BatchNorm statistics must not drift
        # (fastai's freeze, timm's freeze_batch_norm_2d) and their outputs become
        # deterministic, which later allows caching their activations.
        for module in modules_of(model, self.frozen):
            module.eval()

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
