"""Names of the scalar validation metrics, importable without torch (the recipe
checks ``train.metric_for_best`` against them at validation time)."""

from __future__ import annotations

from ..errors import TuneforgeError, suggest

AVERAGES = ("macro", "micro", "weighted")
# Metrics where a smaller value is better (checkpoint selection and early stopping).
LOWER_IS_BETTER = {"loss", "ece", "perplexity"}
# The validation metrics of the generative tasks.
TASK_METRICS = {"causal-lm": ["loss", "perplexity"],
                "preference": ["loss", "reward_accuracy", "reward_margin"]}


def metric_names(multi_label: bool = False) -> list[str]:
    """The scalar validation metrics a run reports: valid values of ``train.metric_for_best``."""
    names = ["loss", "accuracy"] + (["subset_accuracy"] if multi_label else [])
    names += [f"{m}_{a}" for m in ("precision", "recall", "f1") for a in AVERAGES]
    return names + ["roc_auc", "ece"]


def check_metric_name(name: str, multi_label: bool = False, where: str = "train.metric_for_best",
                      task: str | None = None) -> None:
    valid = TASK_METRICS.get(task) or metric_names(multi_label)
    if name not in valid:
        kind = task if task in TASK_METRICS else "multi-label" if multi_label else "single-label"
        raise TuneforgeError(f"{where} '{name}' is not a {kind} validation metric{suggest(name, valid)}; "
                             f"choose one of: {', '.join(valid)}")


def lower_is_better(name: str) -> bool:
    return name in LOWER_IS_BETTER or name.endswith("loss")
