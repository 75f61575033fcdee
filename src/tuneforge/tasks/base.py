"""What every classification task shares: the label map, the classifier module,
loss and metrics. Text and image tasks differ only in reading and batching."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TuneforgeError


class Task(Protocol):
    modality: str

    def read(self, split: str, path: str, *, limit: int | None, skipped: list) -> list: ...
    def label_map(self, train_records: list) -> "LabelMap": ...
    def build_model(self, loaded, labels: "LabelMap") -> nn.Module: ...
    def dataset(self, records: list, labels: "LabelMap", split: str) -> torch.utils.data.Dataset: ...
    def loader(self, dataset, batch_size: int, *, train: bool, seed: int) -> torch.utils.data.DataLoader: ...
    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """``{"loss_sum": (), "count": () or int, "logits": ..., ...}``: the loss summed over what
        it is averaged over (examples for a classifier, target tokens for a causal LM, pairs for
        preference) and how many of those the batch holds. The engine backpropagates sums and
        divides by the total count of the step, so accumulated micro-batches weigh each target
        once, however unevenly they are spread (engine/trainer.py)."""

    def metrics(self, labels: "LabelMap"):
        """``update(logits, labels, *, loss_sum, count, index)`` per batch; ``compute() -> dict``
        with the split's loss as total sum / total count."""
    def settings(self) -> dict: ...


# --------------------------------------------------------------------------- labels

@dataclass
class LabelMap:
    """Label names <-> ids, saved with the model. ``kind`` remembers whether the
    data used integers so predictions come back in the user's own type."""

    names: list[str]
    kind: str = "str"  # "str" | "int"
    multi_label: bool = False
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_values(cls, values: list[Any], multi_label: bool = False) -> "LabelMap":
        flat = {str(v) for v in values}
        is_int = all(_is_int(v) for v in flat)
        names = sorted(flat, key=(lambda v: int(v)) if is_int else None)
        return cls(names=names, kind="int" if is_int else "str", multi_label=multi_label)

    def id(self, value: Any, where: str) -> int:
        try:
            return self._index[str(value)]
        except KeyError:
            shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
            raise TuneforgeError(
                f"{where}: label '{value}' does not occur in the training data (training labels: {shown}); "
                "fix the label, add examples of it to the training data, or delete that row"
            ) from None

    def name(self, index: int) -> Any:
        name = self.names[index]
        return int(name) if self.kind == "int" else name

    def to_json(self) -> dict:
        return {"names": self.names, "kind": self.kind, "multi_label": self.multi_label}

    @classmethod
    def from_json(cls, data: dict) -> "LabelMap":
        return cls(names=list(data["names"]), kind=data.get("kind", "str"), multi_label=data.get("multi_label", False))

    def save(self, path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))


def _is_int(text: str) -> bool:
    try:
        return str(int(text)) == text
    except ValueError:
        return False


# --------------------------------------------------------------------------- model

class Classifier(nn.Module):
    """A pretrained backbone, pooled features, dropout and a new linear head.

    The same module serves text (``input_ids``, ``attention_mask`` -> token
    features -> mean/CLS pooling) and images (``pixel_values`` -> a timm
    backbone built with ``num_classes=0`` already returns pooled features).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_labels: int,
                 modality: str, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.modality = modality
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.task_head = nn.Linear(feature_dim, num_labels)
        # Small init keeps the first logits near uniform (no early loss spike
        # propagating into the pretrained weights).
        nn.init.normal_(self.task_head.weight, std=0.02)
        nn.init.zeros_(self.task_head.bias)

    def features(self, input_ids=None, attention_mask=None, pixel_values=None) -> torch.Tensor:
        if self.modality == "image":
            return self.backbone(pixel_values)  # (B, C)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":  # decoder LLMs: the last real token has seen the whole text
            positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
            last = (attention_mask * positions).argmax(1)  # (B,) padding on either side
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, features=None, **_) -> torch.Tensor:
        # ``features``: pooled backbone outputs from the activation cache (frozen backbone)
        pooled = features if features is not None else self.features(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return self.task_head(self.dropout(pooled))  # (B, num_labels)


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "features", "prefix_activations")


class ClassificationTask:
    """Shared by text and image classification (one level of inheritance only)."""

    modality = "text"

    def __init__(self, recipe):
        self.recipe = recipe
        self.multi_label = recipe.task.multi_label

    # -- labels
    def record_labels(self, record) -> list[Any]:
        value = record.values["label"]
        if not self.multi_label:
            return [value]
        if isinstance(value, (list, tuple)):
            return list(value)
        return [v.strip() for v in str(value).split(self.recipe.task.label_separator) if v.strip()]

    def label_map(self, train_records: list) -> LabelMap:
        values = [v for r in train_records for v in self.record_labels(r)]
        labels = LabelMap.from_values(values, multi_label=self.multi_label)
        if len(labels) < 2 and not self.multi_label:
            only = labels.names[0] if labels.names else "none"
            where = f", e.g. {train_records[0].where}" if train_records else ""
            raise TuneforgeError(
                f"the training data has a single class ('{only}' in all {len(train_records)} rows{where}); "
                "a classifier needs at least two — check data.label_column and that the file holds every class"
            )
        return labels

    def encode_label(self, record, labels: LabelMap):
        ids = [labels.id(v, record.where) for v in self.record_labels(record)]
        if not self.multi_label:
            return ids[0]
        target = [0.0] * len(labels)
        for i in ids:
            target[i] = 1.0
        return target

    # -- model
    def build_model(self, loaded, labels: LabelMap) -> nn.Module:
        return Classifier(loaded.backbone, loaded.info.feature_dim, len(labels), self.modality,
                          pooling=self.recipe.task.pooling, dropout=self.recipe.task.head_dropout)

    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})  # (B, C)
        labels = batch["labels"]
        if self.multi_label:  # one example's loss is its mean over the labels
            per_example = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(1)
            loss_sum = per_example.sum()
        else:
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return {"loss_sum": loss_sum, "count": len(labels), "logits": logits}

    def metrics(self, labels: LabelMap):
        from ..evaluation.metrics import ClassificationMetrics

        # the 20 most confidently wrong examples feed the report; a bounded heap, cheap
        return ClassificationMetrics(len(labels), multi_label=self.multi_label, names=labels.names, top_wrong=20)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float()) if self.multi_label else torch.softmax(logits.float(), -1)
