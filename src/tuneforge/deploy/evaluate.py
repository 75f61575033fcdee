"""`tuneforge eval`: a saved model on new labelled data, metrics streamed."""

from __future__ import annotations

from pathlib import Path

from ..errors import TuneforgeError


def evaluate_run(run_dir, data: str, *, text_column: str | None = None, label_column: str | None = None,
                 batch_size: int = 64) -> dict:
    import torch

    from ..engine.trainer import evaluate_loader
    from ..run.artifact import load_model_dir

    if not Path(data).exists():
        raise TuneforgeError(f"--data path '{data}' does not exist")
    model, task, labels, meta = load_model_dir(Path(run_dir))
    task.recipe.data.id_column = None  # a new evaluation file need not carry the training ids
    if text_column:
        task.recipe.data.text_column = text_column
    if label_column:
        task.recipe.data.label_column = label_column
    skipped: list = []
    records = task.read("test", data, limit=None, skipped=skipped)
    loader = task.loader(task.dataset(records, labels, "test"), batch_size, train=False, seed=0)
    metrics = evaluate_loader(model, task, loader, task.metrics(labels), torch.device("cpu"))
    metrics["data"] = str(data)
    if labels.names:
        _labels_as_predict(metrics, labels)
    return metrics


def _labels_as_predict(metrics: dict, labels) -> None:
    """Label names in the user's own type, as `predict` returns them (integers stay integers)."""
    user = {name: labels.name(i) for i, name in enumerate(labels.names)}
    metrics["labels"] = list(user.values())
    for row in metrics.get("per_class", []):
        row["label"] = user.get(row["label"], row["label"])
    for row in metrics.get("confidently_wrong", []):
        for key in ("label", "predicted"):
            if isinstance(row.get(key), str):  # multi-label rows hold a bool in "predicted"
                row[key] = user.get(row[key], row[key])
