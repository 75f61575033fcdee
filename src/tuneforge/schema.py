"""The floor under every recipe schema: the section base and the registration rules.

``recipe.py`` (the face), ``strategies/options.py`` and ``tasks/options.py`` build on this
module, and it imports nothing of ours but ``errors``, so a strategy or task module can
define its options without importing the recipe (which imports them: that was a circle).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from .errors import TuneforgeError, suggest

# Registered names are lowercase words joined by "-" (they are typed in YAML and on the CLI).
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


class Section(BaseModel):
    """A recipe section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_registration(kind: str, name: str, options_cls: type, key: str, registry: dict, entry: tuple) -> None:
    """The rules of one registration (PEFT's ``register_peft_method``): a well-formed new name,
    and an options class whose ``key`` field (``type`` / ``name``) defaults to that name, so a
    dumped recipe selects the same class again."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} must be lowercase words joined by '-' (e.g. 'text-classification')")
    if name in registry and registry[name] != entry:
        raise ValueError(f"a {kind} named '{name}' is already registered ({_where(registry[name][-1])}); "
                         f"pick another name, or unregister the old one first")
    if not (isinstance(options_cls, type) and issubclass(options_cls, Section)):
        raise TypeError(f"{kind} '{name}': the options class must be a recipe Section subclass, got {options_cls!r}")
    field = options_cls.model_fields.get(key)
    if field is None or field.default != name:
        got = "no such field" if field is None else f"defaults to {field.default!r}"
        raise ValueError(f"{kind} '{name}': {options_cls.__name__}.{key} must default to '{name}' ({got})")


def lookup(kind: str, name: str, registry: dict, where: str):
    """``registry[name]``, or an error with a did-you-mean and every registered name."""
    if name not in registry:
        raise TuneforgeError(
            f"unknown {kind} '{name}'{suggest(name, registry)}; choose one of: {', '.join(sorted(registry))} ({where})")
    return registry[name]


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
