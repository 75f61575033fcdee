"""Tasks: one module per task. A task builds the head, turns records into
batches, computes the loss and declares its metrics."""

from __future__ import annotations

from .base import Classifier, LabelMap, Task


def get_task(recipe) -> Task:
    kind = recipe.task.type
    if kind == "text-classification":
        from .text_classification import TextClassification

        return TextClassification(recipe)
    if kind == "image-classification":
        from .image_classification import ImageClassification

        return ImageClassification(recipe)
    if kind == "causal-lm":
        from .causal_lm import CausalLMTask

        return CausalLMTask(recipe)
    if kind == "preference":
        from .preference import PreferenceTask

        return PreferenceTask(recipe)
    raise AssertionError(kind)  # the recipe schema only admits the types above


__all__ = ["Classifier", "LabelMap", "Task", "get_task"]
