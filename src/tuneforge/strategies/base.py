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

# the registry lives in the light options module (the recipe reads it without torch); re-exported
# here because every strategy module imports ``register`` from its base
from .options import register, registry, unregister  # noqa: F401


class Strategy(Protocol):
    """What the rest of tuneforge may know about a strategy: the methods below and the declared
    capabilities (class attributes). Nothing outside ``strategies/`` compares a strategy's name
    or probes it with ``hasattr``; a new strategy states its facts here instead.

    Capabilities (each strategy class declares them; the defaults live on the two bases):

    - ``frozen_scope``: which part of the model is a fixed function while training, so its
      outputs may be cached: ``"backbone"`` (linear-probe: the pooled features),
      ``"prefix"`` (partial: the lower layer groups, names in ``self.frozen``) or ``"none"``.
    - ``adds_virtual_tokens``: virtual tokens go in front of every text (prompt / prefix
      tuning): rows cannot be packed, and texts are shortened to ``max_text_tokens``.
    - ``needs_task_head``: it trains or schedules a new task head (linear-probe,
      gradual-unfreeze, auto), so tasks whose model has none (causal-lm, label-words) refuse it.
    - ``mergeable``: the update folds into the base weights exactly (``output.merge``, exports).
    - ``plain_export``: the trained model is the base architecture with other weights (after a
      merge when mergeable), so ``export --format safetensors`` can write it.
    - ``saved_layout``: how the final model is saved: ``"plain"`` (whole weights), ``"peft"`` (a
      peft adapter directory on a referenced base), ``"trainable"`` (only the trained tensors on
      a referenced base; loading re-applies the strategy).
    - ``shares_base``: several runs of this strategy on one base can be served from one copy of
      the base (peft adapters switched per request).
    - ``quantized_base``: it trains on a frozen 4-bit base (``model.load_in_4bit``, QLoRA).
    - ``chooses``: it picks another strategy before training (``decide(facts)``), never applies itself.
    - ``modalities``: declared on the options class (``StrategyOptions.modalities``).
    """

    name: str
    frozen_scope: str
    adds_virtual_tokens: bool
    needs_task_head: bool
    mergeable: bool
    plain_export: bool
    saved_layout: str
    shares_base: bool
    quantized_base: bool
    chooses: bool
    frozen: list[str]  # module names kept frozen (and in eval mode), set by apply()
    adapted: list[str]  # what the strategy trains or injects, for the log, set by apply()
    max_text_tokens: int | None  # set by apply() when virtual tokens use up positions

    def apply(self, model: nn.Module, info) -> nn.Module:
        """Freeze / inject / wrap. Returns the model to train (may be a wrapper)."""

    def set_train_mode(self, model: nn.Module) -> None:
        """``model.train()``, keeping frozen parts in eval mode (BatchNorm statistics, dropout)."""

    def will_train(self, model: nn.Module) -> set[str] | None:
        """Parameter names the optimizer must hold from the first step; None: those with
        requires_grad now (gradual-unfreeze adds the groups it unfreezes later)."""

    def callbacks(self, plan, log) -> list:
        """Events the strategy needs during training (``plan``: the run's step counts)."""

    def wrap_schedule(self, fn, plan):
        """Reshape the learning-rate multiplier ``fn(step)`` (per-stage re-warmup); identity by default."""

    # Optimizer parameter groups (learning rates per layer group) are built for every
    # strategy by `param_groups` below, from ModelInfo layer groups, never per strategy.


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


def is_head(name: str) -> bool:
    # peft wraps the head as `base_model.model.task_head.modules_to_save.default.*`
    return name.startswith("task_head.") or ".task_head." in name


def backbone_path(name: str) -> str | None:
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
            path = backbone_path(n)
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
    # declared capabilities (Strategy's docstring says what each means)
    frozen_scope = "none"
    adds_virtual_tokens = False
    needs_task_head = False
    mergeable = False
    plain_export = True
    saved_layout = "plain"
    shares_base = False
    quantized_base = False
    chooses = False
    max_text_tokens: int | None = None

    def __init__(self, options):
        self.options = options
        self.frozen: list[str] = []
        self.adapted: list[str] = []

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

    def will_train(self, model: nn.Module) -> set[str] | None:
        return None

    def callbacks(self, plan, log) -> list:
        return []

    def wrap_schedule(self, fn, plan):
        return fn

# --------------------------------------------------------------------------- parameter-efficient strategies

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

    Declared capabilities (see :class:`Strategy`): subclasses change ``saved_layout``
    (``"peft"`` for peft adapters), ``mergeable``, ``plain_export``, ``adds_virtual_tokens``,
    ``shares_base`` and ``quantized_base`` where they differ from these defaults.
    """

    name = "base"
    frozen_scope = "none"
    adds_virtual_tokens = False
    needs_task_head = False
    mergeable = False
    plain_export = False  # modules or virtual tokens outside the base architecture
    saved_layout = "trainable"
    shares_base = False
    quantized_base = False
    chooses = False
    max_text_tokens: int | None = None

    def __init__(self, options):
        self.options = options
        self.adapted: list[str] = []
        self.frozen: list[str] = []

    def will_train(self, model: nn.Module) -> set[str] | None:
        return None

    def callbacks(self, plan, log) -> list:
        return []

    def wrap_schedule(self, fn, plan):
        return fn

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        freeze_norm_statistics(model)


# --------------------------------------------------------------------------- unwrapping a trained model

def base_module(model: nn.Module) -> nn.Module:
    """The task's own module (``backbone`` + head) under a peft wrapper; the model itself otherwise."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_module(model: nn.Module) -> nn.Module:
    """The model with a peft adapter (LoRA, IA3) folded into its weights; the model itself when it
    carries none. Which wrappers exist is this package's business, so the probe lives here."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
