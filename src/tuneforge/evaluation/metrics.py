"""Streaming classification metrics.

Updated batch by batch and never holding all logits (the HF Trainer's
eval-time memory blow-up): torchmetrics keeps only per-class counts, and the
formulas are theirs, not ours.
"""

from __future__ import annotations

import torch


class ClassificationMetrics:
    def __init__(self, num_labels: int, multi_label: bool = False):
        import torchmetrics.classification as C
        from torchmetrics import MetricCollection

        self.multi_label = multi_label
        if multi_label:
            n = {"num_labels": num_labels}
            self.collection = MetricCollection({
                "subset_accuracy": C.MultilabelExactMatch(**n),
                "accuracy": C.MultilabelAccuracy(**n, average="micro"),
                "precision_macro": C.MultilabelPrecision(**n, average="macro"),
                "recall_macro": C.MultilabelRecall(**n, average="macro"),
                "f1_macro": C.MultilabelF1Score(**n, average="macro"),
                "f1_micro": C.MultilabelF1Score(**n, average="micro"),
                "f1_weighted": C.MultilabelF1Score(**n, average="weighted"),
                "f1_per_label": C.MultilabelF1Score(**n, average="none"),
            })
        else:
            n = {"num_classes": num_labels}
            self.collection = MetricCollection({
                "accuracy": C.MulticlassAccuracy(**n, average="micro"),
                "precision_macro": C.MulticlassPrecision(**n, average="macro"),
                "recall_macro": C.MulticlassRecall(**n, average="macro"),
                "f1_macro": C.MulticlassF1Score(**n, average="macro"),
                "precision_weighted": C.MulticlassPrecision(**n, average="weighted"),
                "recall_weighted": C.MulticlassRecall(**n, average="weighted"),
                "f1_weighted": C.MulticlassF1Score(**n, average="weighted"),
                "confusion_matrix": C.MulticlassConfusionMatrix(**n),
            })
        self.loss_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        if self.multi_label:
            labels = labels.long()
        self.collection.update(logits, labels)
        if loss is not None:
            self.loss_sum += float(loss) * len(labels)
        self.count += len(labels)

    def compute(self) -> dict:
        out = {"loss": self.loss_sum / max(self.count, 1), "examples": self.count}
        for name, value in self.collection.compute().items():
            out[name] = value.tolist() if value.ndim else float(value)
        return out
