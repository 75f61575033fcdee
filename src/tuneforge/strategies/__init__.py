"""Strategies: how a pretrained model is adapted, one module per strategy.

Each module defines an options model (a ``StrategyOptions`` subclass holding its
recipe fields) and a strategy class, and registers both with ``@register``.
Adding a strategy never edits the engine or the recipe schema: the modules of this
package are discovered, not listed, and every list a user sees (docs, errors) is
read from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..schema import lookup
from .options import StrategyOptions, register, registry, unregister

# Modules of this package that register no strategy (shared code).
_HELPERS = frozenset({"base", "merge", "options"})
_loaded = False


def _load_builtins() -> None:
    """Import every strategy module of the package once; importing one runs its @register."""
    global _loaded
    if _loaded:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _HELPERS and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _loaded = True


def options_class(name: str):
    _load_builtins()
    return lookup("strategy", name, registry, "strategy.name")[0]


def get_strategy(options) -> Strategy:
    _load_builtins()
    return registry[options.name][1](options)


def strategy_class(name: str) -> type:
    options_class(name)  # loads the built-ins; unknown names get the did-you-mean error
    return registry[name][1]


def strategy_names() -> list[str]:
    _load_builtins()
    return sorted(registry)


def strategies_where(predicate, modality: str | None = None) -> list[str]:
    """Names of the strategies whose class satisfies ``predicate`` (and that apply to
    ``modality``): the suggestions in error messages, read from declared capabilities."""
    return [n for n in strategy_names() if predicate(registry[n][1])
            and (modality is None or modality in registry[n][0].modalities)]


def __getattr__(name: str):
    # torch-free until a strategy is needed: `import tuneforge.recipe` must not load torch
    if name in ("Strategy", "describe_trainable"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Strategy", "get_strategy", "options_class", "strategy_class", "strategy_names", "strategies_where",
           "register", "unregister", "describe_trainable", "StrategyOptions"]
