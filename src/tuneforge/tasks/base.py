"""What every classification task shares: the label map, the classifier module,
loss and metrics. Text and image tasks differ only in reading and batching."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TuneforgeError
from ..modalities import modality_of


class Task(Protocol):
    """What a run (``run/``, ``engine/``, ``deploy/``) may know about a task: the attributes and
    methods below, nothing else. Every task class declares each of them (the classification and
    causal-LM classes carry the defaults), so callers never probe with ``hasattr``/``getattr``
    and never compare ``type``. A task registers with ``@register_task(name, OptionsClass)``
    (``tasks/options.py``); its options class holds its ``task:`` keys and the facts the recipe
    needs before any task is built (modality, metrics, its own rules).

    Declared capabilities (class attributes, or properties where an option decides):

    - ``type``: the registered name (set by ``register_task``).
    - ``modality``: ``"text"`` or ``"image"``: which models load, how inputs are collated, cached
      and exported (the options class declares the same value; the task reads it from there).
    - ``generative``: it writes text rather than predicting labels (predict refuses it; generate,
      chat and the causal-LM exporters take it).
    - ``needs_lm_head``: the model must load with its language-model head (causal-lm, label-words).
    - ``has_task_head``: the model has a new ``task_head`` (classification with ``classifier: head``).
    - ``cacheable``: frozen parts' outputs may be cached (the activation and prefix caches store
      a task head's input, so a task without one says False).
    - ``max_length``: the token limit of text inputs (None for images); set by ``attach``, and a
      strategy's virtual tokens may lower it.
    - ``truncated``: ``{split: number of inputs cut to max_length}``, filled by ``dataset``.

    Methods, in the order a run calls them: ``read`` -> ``record_labels`` (stratified splits) ->
    ``label_map`` -> ``attach(loaded)`` (tokenizer, limits) -> ``build_model`` -> ``dataset`` ->
    ``loader`` -> ``before_training`` (once, with the untrained weights, before the first step;
    a no-op unless the loss needs a frozen reference, as DPO's does) -> ``callbacks(plan, log)`` (engine
    callbacks of the task's own, e.g. GRPO's rollout figures; [] for most) -> ``forward`` (every step;
    ``{"loss", "logits", ...}``) and ``metrics`` (a fresh streaming accumulator per evaluation) -> ``after_training`` (extra
    metrics such as generation; ``{}`` when none) -> ``settings`` (saved with the model),
    and ``restore(settings)`` when a saved run is loaded.
    Beyond a run, by kind: classifiers (``generative`` False) offer ``encode_inputs``,
    ``probabilities`` and ``format_predictions`` (probabilities -> the dicts predict and serve
    return) for prediction, serving and export, ``sample_inputs`` (the export parity check's
    inputs from a run's data) and ``fold_row`` (a record as a cross-validation fold's JSON
    line); generative tasks offer ``tokenizer``,
    ``template`` and ``build_template``/``build_template_named`` for generation and chat.
    """

    type: str
    modality: str
    generative: bool
    needs_lm_head: bool
    has_task_head: bool
    cacheable: bool
    max_length: int | None
    truncated: dict[str, int]

    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        """Records of one split; bad ones skipped into ``skipped`` (data.on_bad_record: skip); ``log``
        takes one-line notes about the file (e.g. how a ShareGPT file's fields were mapped)."""
    def record_labels(self, record) -> list: ...
    def label_map(self, train_records: list) -> "LabelMap": ...
    def attach(self, loaded) -> None: ...
    def build_model(self, loaded, labels: "LabelMap") -> nn.Module: ...
    def dataset(self, records: list, labels: "LabelMap", split: str) -> torch.utils.data.Dataset: ...
    def loader(self, dataset, batch_size: int, *, train: bool, seed: int) -> torch.utils.data.DataLoader: ...
    def collate(self, items: list[dict]) -> dict: ...
    def before_training(self, model: nn.Module, datasets: dict, device, autocast, run_dir, log) -> None: ...
    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """``{"loss_sum": (), "count": () or int, "logits": ..., ...}``: the loss summed over what
        it is averaged over (examples for a classifier, target tokens for a causal LM, pairs for
        preference) and how many of those the batch holds. The engine backpropagates sums and
        divides by the total count of the step, so accumulated micro-batches weigh each target
        once, however unevenly they are spread (engine/trainer.py)."""

    def metrics(self, labels: "LabelMap"):
        """``update(logits, labels, *, loss_sum, count, index)`` per batch; ``compute() -> dict``
        with the split's loss as total sum / total count."""

    def after_training(self, model: nn.Module, splits: dict, run, device, autocast, log) -> dict: ...
    def callbacks(self, plan, log) -> list:
        """The task's own engine callbacks (``engine/callbacks.py``; GRPO's rollout figures), [] for none."""

    def settings(self) -> dict: ...
    def restore(self, settings: dict) -> None: ...


# --------------------------------------------------------------------------- labels

@dataclass
class LabelMap:
    """Label names <-> ids, saved with the model. ``kind`` remembers whether the
    data used integers so predictions come back in the user's own type.

    Spellings of one label are one class: surrounding whitespace never counts
    (``"pos "`` is ``"pos"``), and numbers are compared by value (``1``, ``"01"``,
    ``"1.0"`` and JSON ``1.0`` are one class; a number written more than one way is
    named by its plain form, ``1``, and one written one way keeps it: ``"07"``).
    ``counts`` and ``merged`` describe the training labels the map was built from
    (:meth:`summary`); they are not saved."""

    names: list[str]
    kind: str = "str"  # "str" | "int"
    multi_label: bool = False
    counts: dict[str, int] = field(default_factory=dict, repr=False, compare=False)  # name -> training examples
    merged: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)  # name -> spellings
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _by_key: dict[tuple, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {n: i for i, n in enumerate(self.names)}
        self._by_key = {}
        for i, n in enumerate(self.names):
            self._by_key.setdefault(label_key(n), i)  # a map saved before spellings merged may repeat a key

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_values(cls, values: list[Any], multi_label: bool = False) -> "LabelMap":
        spellings: dict[tuple, Counter] = {}
        for v in values:
            text = str(clean_label(v))
            spellings.setdefault(label_key(text), Counter())[text] += 1
        # only numbers can be spelt two ways (text keys are the stripped text itself)
        named = {key: key[1] if len(seen) > 1 else next(iter(seen)) for key, seen in spellings.items()}
        is_int = all(_is_int(n) for n in named.values())
        names = sorted(named.values(), key=(lambda v: int(v)) if is_int else None)
        counts = {named[k]: sum(seen.values()) for k, seen in spellings.items()}
        merged = {named[k]: list(seen) for k, seen in spellings.items() if len(seen) > 1}
        return cls(names=names, kind="int" if is_int else "str", multi_label=multi_label, counts=counts,
                   merged=merged)

    def id(self, value: Any, where: str) -> int:
        text = str(clean_label(value))
        found = self._index.get(text)
        if found is None:
            found = self._by_key.get(label_key(text))
        if found is None:
            shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
            raise TuneforgeError(
                f"{where}: label '{value}' does not occur in the training data (training labels: {shown}); "
                "fix the label, add examples of it to the training data, or delete that row"
            )
        return found

    def name(self, index: int) -> Any:
        name = self.names[index]
        return int(name) if self.kind == "int" else name

    def summary(self, limit: int = 20) -> str:
        """"labels (2): neg 30, pos 28" (most frequent first), plus the spellings taken as one."""
        ranked = sorted(self.names, key=lambda n: -self.counts.get(n, 0))
        shown = ", ".join(f"{n} {self.counts.get(n, 0)}" for n in ranked[:limit])
        more = f", ... and {len(ranked) - limit} more" if len(ranked) > limit else ""
        line = f"labels ({len(self.names)}): {shown}{more}"
        for name, forms in self.merged.items():
            line += (f"; {' / '.join(repr(f) for f in forms)} are one label ('{name}'): the same value written "
                     "differently")
        return line

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


def clean_label(value: Any) -> Any:
    """A label as the file holds it, minus what no one means: surrounding whitespace, and the
    ``.0`` of a whole float (a Parquet integer column with a gap is stored as float64)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


def label_key(text: Any) -> tuple:
    """What makes two spellings one label: the value of a number ("01", "1", "1.0", "+1"), else the text."""
    text = str(text).strip()
    if _NUMBER.fullmatch(text):
        return ("number", format(Decimal(text).normalize(), "f"))
    return ("text", text)


def canonical_label(value: Any) -> str:
    """One string per class, whatever the spelling ("01", " 1", 1.0 -> "1"): what to stratify by."""
    return label_key(str(clean_label(value)))[1]


def _label_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a number in a string" if _NUMBER.fullmatch(str(value).strip()) else "a string"


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
        if modality_of(self.modality).spatial:
            return self.backbone(pixel_values)  # (B, C): timm backbones built with num_classes=0 pool themselves
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


def _check_label_types(records: list, labels_of) -> None:
    """Refuse a label column that mixes JSON types: ``true`` beside ``1`` or ``"yes"``, or ``1``
    beside ``"pos"``. A number and a string holding a number agree (they compare by value), and
    CSV cells are all strings, so only JSON and Parquet labels can clash."""
    first: dict[str, tuple] = {}  # type -> (its first label, where); insertion order is first seen
    for r in records:
        for v in labels_of(r):
            first.setdefault(_label_type(v), (v, r.where))
    clash = [(a, b) for a in first for b in first if list(first).index(a) < list(first).index(b)
             and ("a boolean" in (a, b) or {a, b} == {"a number", "a string"})]
    if clash:
        a, b = clash[0]
        (va, wa), (vb, wb) = first[a], first[b]
        raise TuneforgeError(
            f"{wb}: the label {json.dumps(vb)} is {b}, but {wa} has {json.dumps(va)}, {a}: the label column mixes "
            "types, so one class could be counted as two — write every label the same way (all strings, all "
            "integers or all booleans), then train again"
        )


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "features", "prefix_activations")


class ClassificationTask:
    """Shared by text and image classification (one level of inheritance only)."""

    # declared capabilities (see Task); text classification with label-words overrides the head ones
    modality = "text"
    generative = False     # writes text (generate/chat) instead of predicting labels
    needs_lm_head = False  # the model loads with its LM head (label-words)
    has_task_head = True   # a new head on pooled features (label-words: the LM scores the labels)
    cacheable = True       # a head on pooled features: frozen parts may be cached (speed/cache.py)
    max_length: int | None = None

    def __init__(self, recipe):
        self.recipe = recipe
        self.multi_label = recipe.task.multi_label
        self.truncated: dict[str, int] = {}

    # -- labels
    def record_labels(self, record) -> list[Any]:
        value = record.values["label"]
        if not self.multi_label:
            return [clean_label(value)]
        if isinstance(value, (list, tuple)):
            return [clean_label(v) for v in value]
        return [v.strip() for v in str(value).split(self.recipe.task.label_separator) if v.strip()]

    def label_map(self, train_records: list) -> LabelMap:
        _check_label_types(train_records, self.record_labels)
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

    # -- hooks around training (the run calls both; classification needs neither)
    def before_training(self, model, datasets: dict, device, autocast, run_dir, log) -> None:
        """Preparation with the untrained weights, after the datasets exist."""

    def after_training(self, model, splits: dict, run, device, autocast, log) -> dict:
        """Evaluation of the task's own after the final metrics (generation); {} for none."""
        return {}

    def callbacks(self, plan, log) -> list:
        """Engine callbacks of the task's own: none."""
        return []

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float()) if self.multi_label else torch.softmax(logits.float(), -1)

    # -- beyond a run: predictions, the export check's samples, cross-validation folds
    def format_predictions(self, probs: torch.Tensor, labels: LabelMap, inputs: list) -> list[dict]:
        """(N, C) probabilities -> ``{"label", "scores"}`` per row, labels in the user's own type."""
        results = []
        for row in probs:
            scores = {str(labels.names[j]): round(float(p), 6) for j, p in enumerate(row)}
            if labels.multi_label:
                label = [labels.name(j) for j, p in enumerate(row) if p >= 0.5]
            else:
                label = labels.name(int(row.argmax()))
            results.append({"label": label, "scores": scores})
        return results

    def sample_inputs(self, data, n: int):
        """``(inputs, label values, where)`` for up to ``n`` rows of a run's own data (``data``: its
        recipe's data section; validation first), or None when no split can be read."""
        from pathlib import Path

        spec = modality_of(self.modality)
        for split in ("validation", "test", "train"):
            path = getattr(data, split, None)
            if not path or not Path(path).exists():
                continue
            try:
                records = spec.read_inputs(path, column=data.column(split, spec.input),
                                           label_column=data.column(split, "label"), limit=n, data=data, hints={})
                inputs = self.encode_inputs([r.values[spec.input] for r in records]) if records else None
            except TuneforgeError:  # an unreadable row or image: try the next split
                continue
            if records:
                return inputs, [r.values.get("label") for r in records], f"{len(records)} rows of {path}"
        return None

    def fold_row(self, record) -> dict:
        """One line of a cross-validation fold file: the roles a fold's recipe reads back."""
        row = {k: v for k, v in record.values.items() if k in ("text", "label", "id", "image")}
        spec = modality_of(self.modality)
        if spec.files and not isinstance(row.get(spec.input), str):
            raise TuneforgeError(f"{record.where}: images stored inside the data file cannot be split into folds "
                                 "yet; use an image folder or a manifest of image paths")
        return row
