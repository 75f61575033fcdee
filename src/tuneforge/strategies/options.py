"""The base of every strategy's options, and the rules a strategy's capabilities impose on a recipe.

Light on purpose (no torch): the recipe schema and every strategy module import it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ..schema import Section, check_registration

# Stands for the registered strategy names; replaced when the docs are rendered
# (``recipe.describe_fields``), since the registry fills up after this text is written.
STRATEGY_NAMES = "<strategies>"
DEFAULT_STRATEGY = "full"
NAME_DOC = f"How the pretrained model is adapted: {STRATEGY_NAMES} (see the Strategies section)."

# name -> (options class, strategy class); filled by @register as the strategy modules are imported
registry: dict[str, tuple[type, type]] = {}


def register(name: str, options_cls: type):
    """Class decorator: ``@register("lora", LoraOptions)``. Rejects a name already taken, a
    name that is not lowercase words joined by '-', and options whose ``name`` does not default
    to the name (a dumped recipe must select the same strategy again)."""

    def wrap(cls):
        if not (isinstance(options_cls, type) and issubclass(options_cls, StrategyOptions)):
            raise TypeError(f"strategy '{name}': the options class must subclass StrategyOptions, got {options_cls!r}")
        check_registration("strategy", name, options_cls, "name", registry, (options_cls, cls))
        registry[name] = (options_cls, cls)
        cls.name = name
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove a registered strategy (tests that register a throw-away one)."""
    registry.pop(name, None)


class StrategyOptions(Section):
    """Base of every strategy's options; each strategy module registers a subclass."""

    name: str = Field(DEFAULT_STRATEGY, description=NAME_DOC)
    # the input modalities the strategy applies to (checked against the task's modality)
    modalities: ClassVar[tuple[str, ...]] = ("text", "image")

    def check(self, recipe) -> None:
        """Rules between this strategy and the rest of ``recipe``, read from the strategy class's
        declared capabilities; raise ValueError naming the fix. A subclass may add its own."""
        from . import strategies_where, strategy_class

        cls = strategy_class(self.name)
        if recipe.model.load_in_4bit and not cls.quantized_base:
            able = " or ".join(strategies_where(lambda c: c.quantized_base))
            raise ValueError("model.load_in_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit base: set "
                             f"strategy.name: {able} (got {self.name}), or load_in_4bit: false")
        if recipe.output.merge and not cls.mergeable:
            able = " / ".join(strategies_where(lambda c: c.mergeable))
            raise ValueError(
                f"output.merge folds a trained low-rank or scaling update into the base weights; strategy {self.name} "
                "has nothing to fold (its weights are already plain, or its adapters are non-linear) — "
                f"set output.merge: false, or use strategy {able}")
