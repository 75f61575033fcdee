"""Tasks: one module per task. A task builds the head, turns records into
batches, computes the loss and declares its metrics; its options class holds the
``task:`` keys it reads. Modules are discovered, not listed: adding a task is one
module with one ``@register_task``; every list a user sees is read from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..schema import lookup
from .options import TaskOptions, register_task, registry, unregister_task

# Modules of this package that register no task (shared code).
_HELPERS = frozenset({"base", "options", "label_words", "grpo_log"})
_loaded = False


def _load_builtins() -> None:
    """Import every task module of the package once; importing one runs its @register_task."""
    global _loaded
    if _loaded:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _HELPERS and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _loaded = True


def task_options_class(name: str) -> type[TaskOptions]:
    """The options class registered for ``task.type`` ``name``; unknown names get a did-you-mean."""
    _load_builtins()
    return lookup("task", name, registry, "task.type")[0]


def task_class(name: str) -> type:
    task_options_class(name)  # loads the built-ins; unknown names get the did-you-mean error
    return registry[name][1]


def task_names() -> list[str]:
    _load_builtins()
    return sorted(registry)


def get_task(recipe):
    """The task object for ``recipe`` (see ``tasks.base.Task`` for what it offers)."""
    return task_class(recipe.task.type)(recipe)


def __getattr__(name: str):
    # torch-free until a task is needed: `import tuneforge.recipe` must not load torch
    if name in ("Classifier", "LabelMap", "Task"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Classifier", "LabelMap", "Task", "TaskOptions", "get_task", "register_task", "task_class",
           "task_names", "task_options_class", "unregister_task"]
