"""Strategies: how a pretrained model is adapted, one module per strategy.

Each module defines an options model (a ``StrategyOptions`` subclass holding its
recipe fields) and a strategy class, and registers both with ``@register``.
Adding a strategy never edits the engine or the recipe schema.
"""

from __future__ import annotations

import importlib

from ..errors import TuneforgeError, suggest
from .base import Strategy, describe_trainable, register, registry

# Built-in strategy modules; importing them runs their @register.
_BUILTIN = ("full", "linear_probe", "partial", "lora", "gradual_unfreeze", "auto", "bitfit", "adapters", "ia3",
            "prompt_tuning", "prefix_tuning")


def _load_builtins() -> None:
    for mod in _BUILTIN:
        importlib.import_module(f"{__name__}.{mod}")


def options_class(name: str):
    _load_builtins()
    if name not in registry:
        raise TuneforgeError(
            f"unknown strategy '{name}'{suggest(name, registry)}; choose one of: {', '.join(sorted(registry))} (strategy.name)"
        )
    return registry[name][0]


def get_strategy(options) -> Strategy:
    _load_builtins()
    return registry[options.name][1](options)


def strategy_class(name: str) -> type:
    options_class(name)  # loads the built-ins; unknown names get the did-you-mean error
    return registry[name][1]


def strategy_names() -> list[str]:
    _load_builtins()
    return sorted(registry)


__all__ = ["Strategy", "get_strategy", "options_class", "strategy_class", "strategy_names", "register", "describe_trainable"]
