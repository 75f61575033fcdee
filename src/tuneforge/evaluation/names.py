"""Names of the scalar validation metrics, importable without torch (the recipe
checks ``train.metric_for_best`` against them at validation time).

Which metrics a task reports is the task's own declaration (its options'
``metric_names()``); this module keeps what every task shares: the names the
classification metrics report, which names are minimised, and the check.
"""

from __future__ import annotations

from ..errors import TuneforgeError, suggest

AVERAGES = ("macro", "micro", "weighted")
# Metrics where a smaller value is better (checkpoint selection and early stopping).
LOWER_IS_BETTER = {"loss", "ece", "perplexity"}


def metric_names(multi_label: bool = False) -> list[str]:
    """The scalar metrics ``ClassificationMetrics`` reports (the classification tasks' metric names)."""
    names = ["loss", "accuracy"] + (["subset_accuracy"] if multi_label else [])
    names += [f"{m}_{a}" for m in ("precision", "recall", "f1") for a in AVERAGES]
    return names + ["roc_auc", "ece"]


def check_metric_name(name: str, multi_label: bool = False, where: str = "train.metric_for_best",
                      task=None) -> None:
    """``name`` must be one of ``task``'s validation metrics (a task's options: its ``metric_names()``
    and ``metric_kind``); without a task, one of the classification metrics."""
    if task is not None:
        valid, kind = task.metric_names(), task.metric_kind
    else:
        valid, kind = metric_names(multi_label), "multi-label" if multi_label else "single-label"
    if name not in valid:
        raise TuneforgeError(f"{where} '{name}' is not a {kind} validation metric{suggest(name, valid)}; "
                             f"choose one of: {', '.join(valid)}")


def lower_is_better(name: str) -> bool:
    return name in LOWER_IS_BETTER or name.endswith("loss")
