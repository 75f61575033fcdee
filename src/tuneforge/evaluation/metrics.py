"""Streaming classification metrics.

Updated batch by batch and never holding all logits (the HF Trainer's
eval-time memory blow-up): torchmetrics keeps per-class counts, and the
formulas are theirs, not ours. Two exceptions, each small and said here:

* ROC-AUC is exact (torchmetrics' ``thresholds=None``), which keeps one
  probability row per example (N x C floats, e.g. 400 KB for 10,000 examples of
  10 classes) — a binned AUC would stream but no longer match scikit-learn.
* Calibration keeps ``n_bins`` running sums (count, confidence, correct) of our
  own: the reliability diagram needs the bins themselves, which torchmetrics
  does not expose, and computing the ECE from the same bins keeps the number
  and the picture consistent. Tests check it equals torchmetrics' ECE.

All metrics see probabilities (softmax / sigmoid), never raw logits: torchmetrics
decides whether to normalise by looking at the value range, which raw logits that
happen to fall inside [0, 1] would fool.
"""

from __future__ import annotations

import heapq

import torch

from .names import AVERAGES as _AVERAGES
from .names import check_metric_name, lower_is_better, metric_names  # noqa: F401 (re-exported)

class ClassificationMetrics:
    """``update(logits, labels, loss_sum=, count=, index=)`` per batch; ``compute()`` -> one
    JSON-ready dict. The loss is the split's total loss sum over its total count (examples).

    ``names``: label names for the per-class table. ``top_wrong``: keep the indices of
    the most confidently wrong examples (a bounded heap, streaming too).
    """

    def __init__(self, num_labels: int, multi_label: bool = False, names: list[str] | None = None,
                 n_bins: int = 15, top_wrong: int = 0):
        import torchmetrics.classification as C
        from torchmetrics import MetricCollection

        self.multi_label, self.num_labels, self.n_bins, self.top_wrong = multi_label, num_labels, n_bins, top_wrong
        self.names = list(names) if names is not None else [str(i) for i in range(num_labels)]
        metrics = {}
        if multi_label:
            n = {"num_labels": num_labels}
            metrics["subset_accuracy"] = C.MultilabelExactMatch(**n)
            metrics["accuracy"] = C.MultilabelAccuracy(**n, average="micro")
            family = {"precision": C.MultilabelPrecision, "recall": C.MultilabelRecall, "f1": C.MultilabelF1Score}
            self.auroc = C.MultilabelAUROC(**n, average="macro", thresholds=None)
        else:
            n = {"num_classes": num_labels}
            metrics["accuracy"] = C.MulticlassAccuracy(**n, average="micro")
            family = {"precision": C.MulticlassPrecision, "recall": C.MulticlassRecall, "f1": C.MulticlassF1Score}
            metrics["confusion_matrix"] = C.MulticlassConfusionMatrix(**n)
            self.auroc = (C.BinaryAUROC(thresholds=None) if num_labels == 2
                          else C.MulticlassAUROC(**n, average="macro", thresholds=None))
        for m, cls in family.items():
            for avg in (*_AVERAGES, "none"):
                metrics[f"{m}_{avg}"] = cls(**n, average=avg)
        self.collection = MetricCollection(metrics)
        self.support = torch.zeros(num_labels, dtype=torch.long)  # positives per class / label
        self.bins = torch.zeros(3, n_bins, dtype=torch.float64)  # count, sum confidence, sum correct
        self.wrong: list[tuple[float, int, int, int]] = []  # heap of (confidence, index, label, predicted)
        self.loss_sum = 0.0
        self.loss_count = 0  # examples whose loss was given
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, *, loss_sum: torch.Tensor | None = None,
               count: torch.Tensor | int | None = None, index: torch.Tensor | None = None) -> None:
        """``loss_sum``: the batch's loss summed over its ``count`` examples (default: all of them)."""
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()  # (B, C), (B,) or (B, C)
        if self.multi_label:
            labels = labels.long()
            probs = torch.sigmoid(logits)  # (B, C)
            self.support += labels.sum(0)
            predicted = (probs > 0.5).long()
            # each label decision is one binary prediction: confidence max(p, 1 - p)
            conf, correct = torch.maximum(probs, 1 - probs).flatten(), (predicted == labels).flatten()
            self.auroc.update(probs, labels)
        else:
            probs = torch.softmax(logits, -1)  # (B, C)
            self.support += torch.bincount(labels, minlength=self.num_labels)
            conf, predicted = probs.max(-1)
            correct = predicted == labels
            self.auroc.update(probs[:, 1] if self.num_labels == 2 else probs, labels)
        self.collection.update(probs, labels)
        # torchmetrics' binning (bucketize, right=True), with confidence 1.0 in the top bin
        bin_of = (torch.bucketize(conf, torch.linspace(0, 1, self.n_bins + 1), right=True) - 1).clamp(0, self.n_bins - 1)
        for row, values in enumerate((torch.ones_like(conf), conf, correct.float())):
            self.bins[row].index_add_(0, bin_of, values.double())
        if self.top_wrong and index is not None:
            self._track_wrong(probs, predicted, labels, index.cpu())
        if loss_sum is not None:
            self.loss_sum += float(loss_sum)
            self.loss_count += len(labels) if count is None else int(count)
        self.count += len(labels)

    def _track_wrong(self, probs, predicted, labels, index) -> None:
        if self.multi_label:
            rows = (predicted != labels).any(-1).nonzero().flatten().tolist()
        else:
            rows = (predicted != labels).nonzero().flatten().tolist()
        for i in rows:
            if self.multi_label:
                bad = (predicted[i] != labels[i]).nonzero().flatten()
                # the wrong label decision it was surest of
                j = int(bad[torch.argmax(torch.maximum(probs[i, bad], 1 - probs[i, bad]))])
                item = (float(max(probs[i, j], 1 - probs[i, j])), int(index[i]), int(labels[i, j]), j)
            else:
                item = (float(probs[i, predicted[i]]), int(index[i]), int(labels[i]), int(predicted[i]))
            if len(self.wrong) < self.top_wrong:
                heapq.heappush(self.wrong, item)
            else:
                heapq.heappushpop(self.wrong, item)

    def compute(self) -> dict:
        out: dict = {"loss": self.loss_sum / max(self.loss_count, 1), "examples": self.count}
        per = {}
        for name, value in self.collection.compute().items():
            if name.endswith("_none"):
                per[name.removesuffix("_none")] = value.tolist()
            else:
                out[name] = value.tolist() if value.ndim else float(value)
        out["roc_auc"] = self._roc_auc()
        out.update(self._calibration())
        support = self.support.tolist()
        out["per_class"] = [{"label": self.names[c], "precision": per["precision"][c], "recall": per["recall"][c],
                             "f1": per["f1"][c], "support": support[c]} for c in range(self.num_labels)]
        if self.multi_label:
            out["f1_per_label"] = per["f1"]
        if self.top_wrong:
            out["confidently_wrong"] = [
                ({"index": i, "label": self.names[p], "truth": bool(y), "predicted": not y}  # one label decision
                 if self.multi_label else {"index": i, "label": self.names[y], "predicted": self.names[p]})
                | {"confidence": round(c, 6)} for c, i, y, p in sorted(self.wrong, reverse=True)]
        return out

    def _roc_auc(self) -> float | None:
        """Undefined (None) when some class has no positives or no negatives in this split."""
        if self.count == 0 or bool(((self.support == 0) | (self.support == self.count)).any()):
            return None
        return float(self.auroc.compute())

    def _calibration(self) -> dict:
        count, conf, correct = self.bins
        total = max(float(count.sum()), 1.0)
        filled = count > 0
        mean_conf = torch.where(filled, conf / count.clamp(min=1), torch.zeros_like(conf))
        accuracy = torch.where(filled, correct / count.clamp(min=1), torch.zeros_like(conf))
        ece = float(((accuracy - mean_conf).abs() * count).sum() / total)  # Guo et al. 2017, eq. 3
        edges = torch.linspace(0, 1, self.n_bins + 1).tolist()
        return {"ece": ece, "calibration": [
            {"low": round(edges[b], 6), "high": round(edges[b + 1], 6), "count": int(count[b]),
             "confidence": float(mean_conf[b]), "accuracy": float(accuracy[b])} for b in range(self.n_bins)]}
