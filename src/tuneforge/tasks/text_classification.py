"""`text-classification`: single- or multi-label classification of texts.

Texts are tokenised once, when the data set is built (not per epoch), and
padded per batch to the longest member (dynamic padding). With a causal LM,
``task.classifier: label-words`` scores the label names with the LM's own head
instead of a new linear head (``tasks.label_words``); each text is then followed
by ``task.label_prompt``, which truncation never cuts.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch.utils.data import DataLoader, Dataset

from ..data.batching import EpochBatchSampler
from ..errors import TuneforgeError
from ..evaluation.names import metric_names
from .base import ClassificationTask, LabelMap
from .options import TYPE_DOC, HeadDropout, MaxLength, TaskOptions, refuse_encoder_alias, register_task


class TextClassificationOptions(TaskOptions):
    """Single- or multi-label classification of texts: pooled token features and a new linear head, or (with a causal LM) the LM scoring each label's words. Multi-label runs also report subset_accuracy."""

    type: str = Field("text-classification", description=TYPE_DOC)
    classifier: Literal["head", "label-words"] = Field("head", description="text-classification with a causal LM: a new linear head on pooled features (head), or score each label's words with the LM itself (label-words: constrained decoding of the label names; no new weights).")
    label_prompt: str = Field("\nLabel:", description="classifier: label-words: text placed after each input before the label word is scored.")
    label_words: dict[str, str] = Field(default_factory=dict, description="classifier: label-words: the words scored for each label, e.g. {pos: positive, neg: negative}; a label not listed is scored by its own name. Words that are one token of the model's tokenizer score in one forward pass; longer ones cost a pass per label.")
    multi_label: bool = Field(False, description="Each example may carry several labels (sigmoid + binary cross-entropy).")
    label_separator: str = Field(",", description="Separator between labels inside one cell for multi-label CSV/TSV data.")
    max_length: MaxLength = None
    truncation: Literal["truncate", "error"] = Field("truncate", description="Texts longer than max_length: cut them (and report how many), or stop with an error naming each row.")
    pooling: Literal["mean", "cls", "last"] = Field("mean", description="How token features become one vector for the text head: mean over real tokens, the first ([CLS]) token, or the last real token (use last for decoder LLMs such as Llama, Qwen, GPT-2: only the last token has seen the whole text).")
    head_dropout: HeadDropout = 0.1

    modality: ClassVar[str] = "text"
    default_metric: ClassVar[str] = "accuracy"

    @field_validator("label_words", mode="before")
    @classmethod
    def _words_as_text(cls, value: Any) -> Any:
        # YAML reads `{0: negative, 1: positive}` with integer keys: labels are compared as text
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value

    @property
    def task_has_head(self) -> bool:
        return self.classifier == "head"

    @property
    def no_head_reason(self) -> str:
        return "task.classifier: label-words has none (the LM's own head scores the labels)"

    def metric_names(self) -> list[str]:
        return metric_names(self.multi_label)

    @property
    def metric_kind(self) -> str:
        return "multi-label" if self.multi_label else "single-label"

    def check(self, recipe) -> None:
        if self.classifier != "label-words":
            if self.label_words:
                raise ValueError("task.label_words only applies with task.classifier: label-words; set that, or "
                                 "remove task.label_words")
            return
        refuse_encoder_alias(recipe, "task.classifier: label-words scores the label words with",
                             otherwise=", or use task.classifier: head")
        if self.multi_label:
            raise ValueError("task.classifier: label-words picks one label per text (the most likely words); for "
                             "multi-label data use task.classifier: head")


class TokenisedDataset(Dataset):
    def __init__(self, input_ids: list[list[int]], targets: list, where: list[str]):
        self.input_ids, self.targets, self.where = input_ids, targets, where

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.targets[i], "index": i}

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


@register_task("text-classification", TextClassificationOptions)
class TextClassification(ClassificationTask):
    modality = TextClassificationOptions.modality

    def __init__(self, recipe):
        super().__init__(recipe)
        self.tokenizer = None
        self.max_length = recipe.task.max_length
        self.model_max_length: int | None = None  # set by attach(): the model's own limit
        self.truncated = {}
        self.words = None  # label-words: how texts and labels become tokens (set by attach())
        self.label_tokens: dict[str, list[int]] = {}  # label-words: each label's token ids (set by build_model())

    @property
    def has_task_head(self) -> bool:
        return self.recipe.task.task_has_head

    @property
    def needs_lm_head(self) -> bool:
        """label-words scores the labels with the LM's own head, so the model loads with it."""
        return not self.has_task_head

    @property
    def cacheable(self) -> bool:
        """The activation caches store a head's input; label-words has no separate head."""
        return self.has_task_head

    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        from ..data.records import read_records

        data = self.recipe.data
        text_col, label_col = data.column(split, "text"), data.column(split, "label")
        scope = f"data.columns.{split}" if split != "train" else "data"
        columns = {"text": text_col, "label": label_col}
        if data.id_column:
            columns["id"] = data.id_column  # required once set: a row without an id is a bad row
        return read_records(
            path, columns=columns, format=data.format, limit=limit,
            encoding=data.encoding, on_bad_record=data.on_bad_record, skipped=skipped,
            hints={"text": f"{scope}.text_column", "label": f"{scope}.label_column", "id": "data.id_column"},
            unique=("id",) if data.id_column else (),
            kinds={"text": "text", "label": "labels" if self.multi_label else "label", "id": "id"},
        )

    def attach(self, loaded, log=None) -> None:
        """Take the tokenizer and the length limit from the loaded model (``log``: where a
        task.max_length beyond that limit is reported as capped)."""
        if loaded.tokenizer is None:
            raise TuneforgeError(f"model '{loaded.info.source}' has no tokenizer; text tasks need a Hugging Face text model")
        self.tokenizer = loaded.tokenizer
        limit = loaded.info.preprocessing.get("max_length", 512)
        self.model_max_length = limit
        if self.max_length and self.max_length > limit and log is not None:
            log(f"[yellow]task.max_length {self.max_length} capped at {limit}[/]: the most tokens this model takes")
        self.max_length = min(self.max_length or limit, limit)
        if self.needs_lm_head:
            from .label_words import LabelWords, check_decoder

            check_decoder(loaded)
            self.words = LabelWords(self.tokenizer, self.recipe.task.label_prompt)
            if self.words.overhead + 1 > self.max_length:
                raise TuneforgeError(f"task.label_prompt takes {len(self.words.prompt_ids)} tokens, leaving no room "
                                     f"for the text within {self.max_length}; shorten it or raise task.max_length")

    def build_model(self, loaded, labels: LabelMap):
        if not self.needs_lm_head:
            return super().build_model(loaded, labels)
        from .label_words import build

        model = build(loaded, self.words, labels.names, self.recipe.task.label_words)
        self.label_tokens = {str(n): t for n, t in zip(labels.names, model.label_ids)}
        # labels longer than one token are fed after the text: keep within the model's positions
        self.max_length = min(self.max_length, (self.model_max_length or self.max_length) - model.extra_positions)
        if self.max_length <= self.words.overhead:
            raise TuneforgeError(f"the label words take {model.extra_positions + 1} tokens and the prompt "
                                 f"{len(self.words.prompt_ids)}, leaving no room for the text in this model's "
                                 f"{self.model_max_length} positions; use shorter task.label_words or label_prompt")
        return model

    def _tokenize(self, texts: list[str], **kwargs) -> list[list[int]]:
        """Token ids of each text, untruncated; label-words adds the specials and the prompt itself."""
        if not texts:
            return []
        if self.words is None:
            return self.tokenizer(texts, truncation=False, **kwargs)["input_ids"]
        bare = self.tokenizer(texts, truncation=False, add_special_tokens=False, **kwargs)["input_ids"]
        return [self.words.wrap(ids) for ids in bare]

    def dataset(self, records: list, labels: LabelMap, split: str) -> TokenisedDataset:
        texts = [str(r.values["text"]) for r in records]
        # One fast batched call (the Rust tokenizer parallelises internally); only
        # the texts over the limit are encoded again with truncation, so we can
        # report how many were cut without paying for a second full pass.
        kwargs = dict(return_attention_mask=False, return_token_type_ids=False, verbose=False)
        encoded = self._tokenize(texts, **kwargs)
        long = [i for i, ids in enumerate(encoded) if len(ids) > self.max_length]
        if long and self.recipe.task.truncation == "error":
            raise self._too_long(records, encoded, long, split)
        if long and self.words is not None:  # cut the text, keep the prompt
            for i in long:
                encoded[i] = self.words.fit(encoded[i], self.max_length)
        elif long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_length, **kwargs)
            for i, ids in zip(long, cut["input_ids"]):
                encoded[i] = ids
        self.truncated[split] = len(long)
        targets = [self.encode_label(r, labels) for r in records]
        return TokenisedDataset(encoded, targets, [r.where for r in records])

    def _too_long(self, records: list, encoded: list, long: list[int], split: str) -> TuneforgeError:
        shown = "; ".join(f"{records[i].where} ({len(encoded[i])} tokens)" for i in long[:5])
        more = f"; and {len(long) - 5} more" if len(long) > 5 else ""
        limit = self.model_max_length or self.max_length
        raise_it = (f"raise task.max_length (this model takes up to {limit})" if self.max_length < limit
                    else f"this model takes at most {limit} tokens, so shorten those texts")
        return TuneforgeError(
            f"{len(long)} {split} text(s) are longer than task.max_length = {self.max_length} tokens (special "
            f"tokens included) and task.truncation is 'error': {shown}{more} — {raise_it}, or set "
            "task.truncation: truncate to cut them (the count is reported in the manifest)"
        )

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest: (ids, attention mask), both (B, T)."""
        pad = self.tokenizer.pad_token_id or 0
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)  # (B, T)
        for row, s in enumerate(sequences):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        return ids, mask

    def collate(self, items: list[dict]) -> dict:
        ids, mask = self.pad([it["input_ids"] for it in items])
        dtype = torch.float32 if self.multi_label else torch.long
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([it["labels"] for it in items], dtype=dtype),
            "index": torch.tensor([it["index"] for it in items]),
        }

    def loader(self, dataset: TokenisedDataset, batch_size: int, *, train: bool, seed: int) -> DataLoader:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, lengths=dataset.lengths,
                                    group_by_length=self.recipe.train.group_by_length)
        workers = self.recipe.data.num_workers or 0
        # A private generator: creating an iterator draws a worker seed from it, not from
        # the global RNG, so a resumed run's dropout masks match an uninterrupted run's.
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=workers,
                          generator=torch.Generator().manual_seed(seed))

    def settings(self) -> dict:
        out = {"max_length": self.max_length, "pooling": self.recipe.task.pooling, "truncated": dict(self.truncated)}
        if self.words is not None:
            out["classifier"] = "label-words"
            out["prompt_tokens"] = self.words.prompt_ids
            out["label_tokens"] = dict(self.label_tokens)
        return out

    def restore(self, settings: dict) -> None:
        """Take back what :meth:`settings` recorded (a saved run being loaded)."""
        if "max_length" in settings:
            self.max_length = settings["max_length"]

    # -- prediction
    def encode_inputs(self, texts: list[str]) -> dict:
        if self.words is not None:
            encoded = self._tokenize([str(t) for t in texts], verbose=False)
            ids, mask = self.pad([self.words.fit(e, self.max_length) if len(e) > self.max_length else e
                                  for e in encoded])
            return {"input_ids": ids, "attention_mask": mask}
        enc = self.tokenizer([str(t) for t in texts], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
