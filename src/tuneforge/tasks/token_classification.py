"""`token-classification`: one tag per word (named entities, part-of-speech, any per-token tagging).

Data (``data/tagging.py``): CoNLL column files, JSON lines of ``{tokens, tags}`` or of
``{text, entities: [{start, end, label}]}``. Tags in IOB1 / IOB2 / BIOES (or plain tags,
``scheme: none``) are read into entities, checked (an ``I-X`` that opens an entity is
repaired or reported, ``task.on_invalid_tag``) and written in the scheme the model learns
(``task.model_scheme``).

A sentence is tokenised word by word, once. The loss is on each word's first sub-token
(``task.subtokens: first``; the other pieces are ignored) or on every piece (``all``: a
``B-X`` word's later pieces learn ``I-X``); a word is always *predicted* from its first
piece. A sentence longer than ``task.max_length`` is cut into windows that overlap by
``task.stride`` sub-tokens, and each piece is read from the window where it has the most
context on both sides (the "max context" rule of BERT's SQuAD code), so predictions merge
back into one tag per word. The word-level scores are gathered inside the model
(:class:`TokenTagger`), so training, evaluation, prediction and serving all see
``(sentences, words, tags)`` and nothing downstream handles windows; exported graphs are the
plain per-sub-token model.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..data.batching import EpochBatchSampler
from ..data.tag_schemes import MODEL_SCHEMES, OUTSIDE, SCHEMES, split_tag, strict_spans, subword_tags, tag_names
from ..errors import TuneforgeError
from ._tagger import TaggedSentences, TokenTagger, gather_words
from .base import LabelMap
from .options import TYPE_DOC, HeadDropout, MaxLength, TaskOptions, register_task

METRICS = ["loss", "f1", "precision", "recall", "f1_macro", "token_accuracy"]


class TokenClassificationOptions(TaskOptions):
    """One tag per word (NER, part-of-speech, any per-token tagging) from CoNLL column files or JSON lines of words + tags or of text + character spans; a linear head on every sub-token's features. Reports entity-level precision/recall/F1 (seqeval's strict definition), their macro F1 over types, token accuracy and a per-type table."""

    type: str = Field("token-classification", description=TYPE_DOC)
    scheme: Literal["auto", "iob1", "iob2", "bioes", "none"] = Field("auto", description="Tag scheme of the data files: iob1, iob2, bioes (B-/I-/E-/S- prefixes), or none (plain tags, each its own class, e.g. part-of-speech). auto detects it per file (E-/S- prefixes: bioes; entities opened by I- and B- only between touching entities: iob1; else iob2; no prefixes: none) and logs what it chose.")
    model_scheme: Literal["iob2", "bioes"] = Field("iob2", description="Scheme the model learns and predicts (the data is converted to it); metrics read entities in it, strictly.")
    on_invalid_tag: Literal["repair", "error"] = Field("repair", description="A tag that breaks the scheme (an I-X after O or after another type in IOB2; an unclosed entity in BIOES): repair reads it as the start of a new entity (counted in the log); error stops and names the file and line.")
    subtokens: Literal["first", "all"] = Field("first", description="Which sub-tokens of a word carry its tag in the loss: the first (the others are ignored), or all (later pieces of a B-X word learn I-X). A word is predicted from its first sub-token either way.")
    max_length: MaxLength = None
    stride: Optional[int] = Field(None, ge=0, description="Sentences longer than max_length are cut into windows overlapping by this many sub-tokens; each sub-token is read from the window where it has the most context. Default: a quarter of the window.")
    decoding: Literal["constrained", "argmax"] = Field("constrained", description="How word scores become tags: the most likely valid sequence (Viterbi over the allowed scheme transitions, so no predicted word falls out of an entity), or each word's most likely tag.")
    word_column: int = Field(0, description="CoNLL files: the column holding the word (0 = first).")
    tag_column: int = Field(-1, description="CoNLL files: the column holding the tag (-1 = last; CoNLL-2003 is word, POS, chunk, NER).")
    tokens_field: str = Field("tokens", description="JSON lines of words: the field holding the list of words.")
    tags_field: str = Field("tags", description="JSON lines of words: the field holding the list of tags (strings, or integers indexing tag_names).")
    tag_names: list[str] = Field(default_factory=list, description="Names of integer tags (e.g. Hugging Face datasets' ner_tags): tag i is tag_names[i].")
    text_field: str = Field("text", description="JSON lines of character spans: the field holding the raw text.")
    entities_field: str = Field("entities", description="JSON lines of character spans: the field holding [{start, end, label}] (character offsets, end exclusive).")
    head_dropout: HeadDropout = 0.1

    modality: ClassVar[str] = "text"
    default_metric: ClassVar[str] = "f1"

    def metric_names(self) -> list[str]:
        return list(METRICS)

    def check(self, recipe) -> None:
        data = recipe.data
        if data.format not in ("auto", "jsonl", "tsv"):
            raise ValueError(f"data.format {data.format}: token-classification reads CoNLL column files (any "
                             "extension) and JSON lines (.jsonl); set data.format: auto")
        moved = {"data.text_column": (data.text_column, "text", "task.text_field"),
                 "data.label_column": (data.label_column, "label", "task.tags_field or task.tag_column")}
        for key, (value, default, instead) in moved.items():
            if value != default:
                raise ValueError(f"{key} is not read by token-classification; set {instead} instead")
        if data.columns or data.id_column:
            raise ValueError("data.columns and data.id_column are not read by token-classification; name the fields "
                             "with task.tokens_field / tags_field / text_field / entities_field")
        if recipe.retain.data:
            raise ValueError("retain.data (forgetting) is not measured for token-classification yet; remove the "
                             "retain section")
        if self.word_column < 0 and self.word_column == self.tag_column:
            raise ValueError("task.word_column and task.tag_column name the same column")


@register_task("token-classification", TokenClassificationOptions)
class TokenClassification:
    # declared capabilities (see tasks.base.Task)
    modality = TokenClassificationOptions.modality
    generative = False
    needs_lm_head = False
    has_task_head = True
    cacheable = False  # the activation caches store pooled features; a tagger's head reads every sub-token

    def __init__(self, recipe):
        self.recipe = recipe
        self.opts = recipe.task
        self.tokenizer = None
        self.max_length = self.opts.max_length
        self.stride: int | None = None
        self.truncated: dict[str, int] = {}  # nothing is truncated: long sentences are windowed
        self.windowed: dict[str, int] = {}  # {split: sentences longer than one window}
        self.output_scheme = self.opts.model_scheme if self.opts.scheme != "none" else "none"
        self._specials: tuple[int, int] = (0, 0)  # special tokens before / after a window's pieces
        self._around: tuple[list[int], list[int]] = ([], [])  # their ids
        self.log = None

    # -- data
    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        from ..data.tagging import TaggedReader

        data = self.recipe.data
        reader = TaggedReader(self.opts, encoding=data.encoding, on_bad_record=data.on_bad_record, skipped=skipped,
                              data_format=data.format, log=self._say)
        records = reader.read(path, limit)
        if split == "train" and self.opts.scheme == "auto":
            plain = all(split_tag(t)[0] in ("", OUTSIDE) for r in records for t in r.values["label"]["tags"])
            self.output_scheme = "none" if plain and any(t != OUTSIDE for r in records
                                                         for t in r.values["label"]["tags"]) else self.opts.model_scheme
        return records

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        else:
            import sys

            print(message.replace("[yellow]", "").replace("[/]", ""), file=sys.stderr)

    def record_labels(self, record) -> list:
        return sorted(set(record.values["label"]["tags"]))

    def label_map(self, train_records: list) -> LabelMap:
        from collections import Counter

        counts = Counter(t for r in train_records for t in r.values["label"]["tags"])
        if self.output_scheme == "none":
            types = [t for t in counts if t != OUTSIDE]
        else:
            types = sorted({split_tag(t)[1] for t in counts if t != OUTSIDE})
        if not types:
            where = f" (e.g. {train_records[0].where})" if train_records else ""
            raise TuneforgeError(f"the training data has no tags other than O in {len(train_records)} sentences{where}; "
                                 "a tagger needs examples of what to tag — check task.tag_column / tags_field")
        names = tag_names(types, self.output_scheme)
        return LabelMap(names=names, counts={n: counts.get(n, 0) for n in names})

    # -- model
    def attach(self, loaded, log=None) -> None:
        if log is not None:
            self.log = log
        if loaded.tokenizer is None or not getattr(loaded.tokenizer, "is_fast", False):
            raise TuneforgeError(f"model '{loaded.info.source}' has no fast (Rust) tokenizer; token-classification maps "
                                 "sub-tokens back to words with it — use a Hugging Face text model with tokenizer.json")
        self.tokenizer = _pretokenized_ready(loaded.tokenizer)
        limit = loaded.info.preprocessing.get("max_length", 512)
        if self.max_length and self.max_length > limit and log is not None:
            log(f"[yellow]task.max_length {self.max_length} capped at {limit}[/]: the most tokens this model takes")
        self.max_length = min(self.max_length or limit, limit)
        # the special tokens around a text (BERT: [CLS] ... [SEP]), read off one encoded word
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
        self._around = (full[:at], full[at + len(bare):])
        self._specials = (len(self._around[0]), len(self._around[1]))

    @property
    def window(self) -> int:
        """Sub-tokens of a sentence per window (max_length less the special tokens)."""
        room = self.max_length - sum(self._specials)
        if room < 2:
            raise TuneforgeError(f"task.max_length {self.max_length} leaves no room for words besides this model's "
                                 f"{sum(self._specials)} special tokens; raise task.max_length")
        stride = self.opts.stride if self.opts.stride is not None else room // 4
        if stride >= room:
            raise TuneforgeError(f"task.stride {stride} must be smaller than a window's {room} sub-tokens "
                                 f"(task.max_length {self.max_length} less {sum(self._specials)} special tokens)")
        self.stride = stride
        return room

    def build_model(self, loaded, labels: LabelMap) -> nn.Module:
        return TokenTagger(loaded.backbone, loaded.info.feature_dim, len(labels), dropout=self.opts.head_dropout)

    def _pieces(self, words: list[list[str]]) -> list[tuple[list[int], list[int]]]:
        """Per sentence: (sub-token ids, the sub-token index of each word's first piece or -1)."""
        if not words:
            return []
        some = [i for i, ws in enumerate(words) if ws]  # a sentence of no words (an empty input) has no pieces
        enc = self.tokenizer([words[i] for i in some], is_split_into_words=True, add_special_tokens=False,
                             return_attention_mask=False, return_token_type_ids=False, verbose=False) if some else None
        out = [([], []) for _ in words]
        for j, i in enumerate(some):
            first = [-1] * len(words[i])
            for p, w in enumerate(enc.word_ids(j)):
                if w is not None and first[w] < 0:
                    first[w] = p
            out[i] = (enc["input_ids"][j], first)
        return out

    def dataset(self, records: list, labels: LabelMap, split: str) -> TaggedSentences:
        all_pieces = self.opts.subtokens == "all"
        items = []
        room = self.window
        for record, (ids, first) in zip(records, self._pieces([r.values["tokens"] for r in records])):
            tags = record.values["label"]["tags"]
            item = {"ids": ids, "first": first, "tags": [labels.id(t, record.where) for t in tags]}
            if all_pieces:
                ends = [f for f in first[1:] if f >= 0] + [len(ids)]
                piece_tags = [-100] * len(ids)
                starts = [f for f in first if f >= 0]
                owners = [t for t, f in zip(tags, first) if f >= 0]
                for start, end, tag in zip(starts, ends, owners):
                    for j, name in enumerate(subword_tags(tag, end - start, self.output_scheme)):
                        piece_tags[start + j] = labels.id(name, record.where)
                item["piece_tags"] = piece_tags
            items.append(item)
        self.windowed[split] = sum(len(it["ids"]) > room for it in items)
        if self.windowed[split] and self.log is not None:
            self.log(f"{split}: {self.windowed[split]} sentence(s) longer than {room} sub-tokens are read in windows "
                     f"overlapping by {self.stride} (task.max_length, task.stride)")
        return TaggedSentences(items, [r.where for r in records])

    def windows(self, n: int) -> list[tuple[int, int]]:
        room = self.window
        if n <= room:
            return [(0, n)]
        step = room - self.stride
        starts = list(range(0, n - room, step)) + [n - room]
        return [(s, s + room) for s in starts]

    def collate(self, items: list[dict]) -> dict:
        before, _ = self._specials
        rows, index, piece_labels, owned = [], [], [], []
        for b, item in enumerate(items):
            ids, n = item["ids"], len(item["ids"])
            spans = self.windows(n)
            # each piece is read from the window where it has the most context on both sides
            owner = [max(range(len(spans)), key=lambda k: (min(p - spans[k][0], spans[k][1] - 1 - p), -k))
                     if len(spans) > 1 else 0 for p in range(n)]
            base = len(rows)
            for k, (s, e) in enumerate(spans):
                rows.append(self._around[0] + ids[s:e] + self._around[1])
                owned.append((base + k, s, [p for p in range(s, e) if owner[p] == k], b))
            for w, p in enumerate(item["first"]):
                if p >= 0:
                    k = owner[p]
                    index.append((base + k, before + p - spans[k][0], b, w))
            if "piece_tags" in item:
                piece_labels.append(item["piece_tags"])
        ids, mask = self.pad(rows)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "word_index": torch.tensor(index, dtype=torch.long).view(-1, 4),
                 "word_count": torch.tensor([len(it["first"]) for it in items], dtype=torch.long),
                 "index": torch.tensor([it.get("index", i) for i, it in enumerate(items)])}
        if "tags" in items[0]:
            words = max(len(it["tags"]) for it in items)
            labels = torch.full((len(items), words), -100, dtype=torch.long)
            for b, it in enumerate(items):
                labels[b, :len(it["tags"])] = torch.tensor(it["tags"], dtype=torch.long)
            batch["labels"] = labels
            if piece_labels:
                targets = torch.full_like(ids, -100)
                for row, s, pieces, b in owned:
                    for p in pieces:
                        targets[row, before + p - s] = items[b]["piece_tags"][p]
                batch["piece_labels"] = targets
        return batch

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest: (ids, attention mask), both (N, T)."""
        pad = self.tokenizer.pad_token_id or 0
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, s in enumerate(sequences):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        return ids, mask

    def loader(self, dataset: TaggedSentences, batch_size: int, *, train: bool, seed: int) -> DataLoader:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, lengths=dataset.lengths,
                                    group_by_length=self.recipe.train.group_by_length)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.recipe.data.num_workers or 0, generator=torch.Generator().manual_seed(seed))

    def forward(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        tokens = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (N, T, C)
        words = gather_words(tokens, batch["word_index"], batch["word_count"])  # (B, W, C)
        if "piece_labels" in batch:  # subtokens: all
            targets = batch["piece_labels"]
            loss_sum = F.cross_entropy(tokens.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
        else:  # a word's first sub-token; a word without sub-tokens has nothing to learn from
            targets = batch["labels"].clone()
            has_piece = torch.zeros_like(targets, dtype=torch.bool)
            has_piece[batch["word_index"][:, 2], batch["word_index"][:, 3]] = True
            targets[~has_piece] = -100
            loss_sum = F.cross_entropy(words.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
        return {"loss_sum": loss_sum, "count": (targets != -100).sum(), "logits": words}

    def metrics(self, labels: LabelMap):
        from ..evaluation.tagging import TaggingMetrics

        return TaggingMetrics(labels.names, self.output_scheme, constrained=self.opts.decoding == "constrained",
                              top_wrong=20)

    def before_training(self, model, datasets: dict, device, autocast, run_dir, log) -> None:
        """Nothing to prepare with the untrained weights."""

    def callbacks(self, plan, log) -> list:
        return []  # no engine callbacks of its own

    def after_training(self, model, splits: dict, run, device, autocast, log) -> dict:
        return {}

    def settings(self) -> dict:
        return {"max_length": self.max_length, "stride": self.stride, "output_scheme": self.output_scheme,
                "subtokens": self.opts.subtokens, "windowed": dict(self.windowed),
                "words": "raw strings are split into words with the regex \\w+|[^\\w\\s]"}

    def restore(self, settings: dict) -> None:
        self.max_length = settings.get("max_length", self.max_length)
        self.output_scheme = settings.get("output_scheme", self.output_scheme)

    # -- prediction
    def words_of(self, value) -> tuple[str, list[list[int]]]:
        """(text, word offsets) of one input: a raw string split by ``data.tagging.split_words``,
        or a list of words (joined by spaces)."""
        from ..data.tagging import joined, split_words

        if isinstance(value, str):
            return value, [list(s) for s in split_words(value)]
        if isinstance(value, (list, tuple)) and all(isinstance(w, str) and w and not any(c.isspace() for c in w)
                                                    for w in value):
            return joined(list(value))
        raise TuneforgeError(f"a token-classification input is a string or a list of words without spaces, got "
                             f"{type(value).__name__}")

    def encode_inputs(self, inputs: list) -> dict:
        if not inputs:
            return {}
        words = []
        for value in inputs:
            text, offsets = self.words_of(value)
            words.append([text[a:b] for a, b in offsets])
        return self.collate([{"ids": ids, "first": first} for ids, first in self._pieces(words)])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1)

    def format_predictions(self, probs: torch.Tensor, labels: LabelMap, inputs: list) -> list[dict]:
        """(N, W, C) word probabilities -> per input ``{"entities": [{label, start, end, text, score}],
        "tokens": [{text, start, end, tag, score}]}``; offsets index the input's characters."""
        from ..data.tag_schemes import allowed_transitions
        from ..evaluation.tagging import decode, span_score

        masks = allowed_transitions(labels.names, self.output_scheme) if self.opts.decoding == "constrained" else None
        results = []
        for row, value in zip(probs, inputs):
            text, offsets = self.words_of(value)
            p = row[:len(offsets)]
            tags = decode(p.clamp_min(1e-12).log().unsqueeze(0), torch.tensor([len(offsets)]), masks)[0].tolist()
            names = [labels.names[t] for t in tags]
            entities = [{"label": kind, "start": offsets[a][0], "end": offsets[b - 1][1],
                         "text": text[offsets[a][0]:offsets[b - 1][1]], "score": round(span_score(p, tags, a, b), 6)}
                        for a, b, kind in strict_spans(names, self.output_scheme)]
            tokens = [{"text": text[s:e], "start": s, "end": e, "tag": names[i], "score": round(float(p[i, tags[i]]), 6)}
                      for i, (s, e) in enumerate(offsets)]
            results.append({"entities": entities, "tokens": tokens})
        return results

    def sample_inputs(self, data, n: int):
        """Up to ``n`` sentences of the run's own data as the plain model's inputs (an exported graph
        takes sub-token ids and mask, without the word gathering), or None when none can be read."""
        from pathlib import Path

        from ..data.tagging import TaggedReader

        for split in ("validation", "test", "train"):
            path = getattr(data, split, None)
            if not path or not Path(path).exists():
                continue
            try:
                records = TaggedReader(self.opts, encoding=data.encoding, on_bad_record="skip", skipped=[],
                                       data_format=data.format, log=lambda m: None).read(path, limit=n)
            except TuneforgeError:
                continue
            if records:
                batch = self.encode_inputs([r.values["tokens"] for r in records])
                return ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, None,
                        f"{len(records)} sentences of {path}")
        return None

    def fold_row(self, record) -> dict:
        """A cross-validation fold's line: the row as read, so the fold reads back identically."""
        return record.values["label"]["row"]


def _pretokenized_ready(tokenizer):
    """A byte-level BPE tokenizer (RoBERTa, GPT-2) takes lists of words only when it adds the
    space before each word itself; its own directory is loaded again with that set."""
    try:
        tokenizer([["a", "b"]], is_split_into_words=True, add_special_tokens=False)
        return tokenizer
    except ValueError as err:
        if "add_prefix_space" not in str(err):
            raise
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_prefix_space=True)


__all__ = ["SCHEMES", "MODEL_SCHEMES", "TokenClassification", "TokenClassificationOptions", "TokenTagger",
           "gather_words"]
