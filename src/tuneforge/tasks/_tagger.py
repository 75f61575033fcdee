"""The module and dataset of ``token-classification`` (kept apart from the task so each file stays
small): a tagger that gathers word scores from windows of sub-tokens, and tokenised sentences."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


def gather_words(token_logits: torch.Tensor, word_index: torch.Tensor, word_count: torch.Tensor) -> torch.Tensor:
    """(windows, T, C) sub-token scores -> (sentences, W, C) word scores. ``word_index`` rows are
    (window, position, sentence, word): where each word's first sub-token is read. A word without
    any sub-token (a character the tokenizer drops) keeps zero scores: no tag is preferred."""
    words = int(word_count.max()) if len(word_count) else 0
    out = token_logits.new_zeros(len(word_count), words, token_logits.shape[-1])  # (B, W, C)
    if len(word_index):
        out[word_index[:, 2], word_index[:, 3]] = token_logits[word_index[:, 0], word_index[:, 1]]
    return out


class TokenTagger(nn.Module):
    """A pretrained encoder, dropout and a new linear head on every sub-token's features.

    ``forward(input_ids, attention_mask)`` -> (windows, T, C) sub-token logits (what exports
    run); with ``word_index`` and ``word_count`` (from the task's batches) -> (sentences, W, C)
    word logits, gathered as described in :func:`gather_words`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.task_head = nn.Linear(feature_dim, num_labels)
        nn.init.normal_(self.task_head.weight, std=0.02)  # near-uniform first logits (as the classifier's head)
        nn.init.zeros_(self.task_head.bias)

    def forward(self, input_ids=None, attention_mask=None, word_index=None, word_count=None, **_) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        logits = self.task_head(self.dropout(hidden))  # (N, T, C)
        return logits if word_index is None else gather_words(logits, word_index, word_count)


class TaggedSentences(Dataset):
    """Sentences tokenised once: sub-token ids, each word's first sub-token, word labels and
    (for ``subtokens: all``) each sub-token's label."""

    def __init__(self, items: list[dict], where: list[str]):
        self.items, self.where = items, where

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "index": i}

    @property
    def lengths(self) -> list[int]:
        return [len(it["ids"]) for it in self.items]

    @property
    def input_ids(self) -> list[list[int]]:
        return [it["ids"] for it in self.items]
