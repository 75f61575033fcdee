"""Old import paths kept for one release (CHANGELOG.md lists them): each is a module whose
attributes are looked up in the modules that now hold them."""

from __future__ import annotations

import importlib
import warnings


def forward(old: str, new: tuple[str, ...]):
    """A module ``__getattr__`` for ``old`` that finds each name in the first of ``new`` holding it."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for target in new:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError:
                continue
            if hasattr(module, name):
                warnings.warn(f"{old}.{name} moved to {target}.{name}; the old path goes away in tuneforge 0.3",
                              DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved: see {', '.join(new)})")

    return __getattr__
