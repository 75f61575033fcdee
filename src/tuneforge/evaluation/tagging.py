"""Streaming metrics of per-token tagging, and the decoding predictions share with them.

Per batch, each sentence's word scores are decoded into tags (constrained to valid sequences
by default, ``decode``), read into entities (``data.tag_schemes.strict_spans``: seqeval's
strict definition) and counted: true positives, false positives and false negatives per
entity type, a word-level confusion matrix, and a bounded heap of the most confident wrong
spans. Nothing per sentence is kept between batches, so a split of any size costs the same
memory. ``compute()`` gives entity-level micro precision / recall / F1 (seqeval's
``f1_score(..., mode="strict")``), their macro F1 over types, token (word) accuracy and the
per-type table.
"""

from __future__ import annotations

import heapq
from collections import Counter

import torch

from ..data.tag_schemes import allowed_transitions, strict_spans

NEG = -1e9  # a forbidden step of a tag sequence


def decode(logits: torch.Tensor, lengths: torch.Tensor, masks=None) -> torch.Tensor:
    """(B, W, C) word scores -> (B, W) tag ids. ``masks``: ``allowed_transitions(...)`` for the
    best *valid* sequence (Viterbi over log-probabilities; an I- tag cannot follow O, ...), or
    None for each word's most likely tag. Positions past a sentence's length are left as they
    fall; callers read the first ``length`` of each row."""
    logp = torch.log_softmax(logits.float(), -1)  # (B, W, C)
    b, w, c = logp.shape
    if masks is None or w == 0:
        return logp.argmax(-1)
    start, trans, end = (torch.where(m, 0.0, NEG) for m in masks)  # (C,), (C, C), (C,)
    score = logp[:, 0] + start  # (B, C)
    back = torch.zeros(b, w, c, dtype=torch.long)
    same = torch.arange(c).expand(b, c)
    for t in range(1, w):
        best, arg = (score.unsqueeze(2) + trans).max(1)  # (B, C): best previous tag for each next tag
        live = (t < lengths).unsqueeze(1)  # (B, 1): past its end a sentence's score stays put
        score = torch.where(live, best + logp[:, t], score)
        back[:, t] = torch.where(live, arg, same)
    last = (score + end).argmax(1)  # (B,)
    path = [last]
    for t in range(w - 1, 0, -1):
        last = back[:, t].gather(1, last.unsqueeze(1)).squeeze(1)
        path.append(last)
    return torch.stack(path[::-1], 1)  # (B, W)


def span_score(probs: torch.Tensor, tags: list[int], start: int, end: int) -> float:
    """A span's score: the mean probability of its decoded tags over its words."""
    return float(sum(float(probs[i, tags[i]]) for i in range(start, end)) / (end - start))


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1 with seqeval's zero division (0.0)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


class TaggingMetrics:
    """``update(logits (B, W, C), labels (B, W), loss_sum=, count=, index=)`` per batch of word
    scores (labels -100 past each sentence's end); ``compute()`` -> one JSON-ready dict."""

    def __init__(self, names: list[str], scheme: str, *, constrained: bool = True, top_wrong: int = 20):
        self.names, self.scheme, self.top_wrong = list(names), scheme, top_wrong
        self.masks = allowed_transitions(self.names, scheme) if constrained else None
        c = len(self.names)
        self.confusion = torch.zeros(c, c, dtype=torch.long)  # (true, predicted) words
        self.tp, self.fp, self.fn = Counter(), Counter(), Counter()
        self.wrong: list[tuple] = []  # heap of (score, sentence, start, end, predicted type, what was there)
        self.loss_sum, self.loss_count, self.sentences = 0.0, 0, 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, *, loss_sum=None, count=None, index=None) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        lengths = (labels != -100).sum(1)  # (B,)
        predicted = decode(logits, lengths, self.masks)  # (B, W)
        probs = torch.softmax(logits, -1)
        real = labels != -100
        c = len(self.names)
        self.confusion += torch.bincount(labels[real] * c + predicted[real], minlength=c * c).view(c, c)
        for b in range(len(labels)):
            n = int(lengths[b])
            gold_ids, pred_ids = labels[b, :n].tolist(), predicted[b, :n].tolist()
            gold = set(strict_spans([self.names[i] for i in gold_ids], self.scheme))
            pred = strict_spans([self.names[i] for i in pred_ids], self.scheme)
            for span in pred:
                if span in gold:
                    self.tp[span[2]] += 1
                else:
                    self.fp[span[2]] += 1
                    if self.top_wrong and index is not None:
                        self._track(span_score(probs[b], pred_ids, span[0], span[1]), int(index[b]), span, gold)
            for span in gold.difference(pred):
                self.fn[span[2]] += 1
        if loss_sum is not None:
            self.loss_sum += float(loss_sum)
            self.loss_count += int(count) if count is not None else int(real.sum())
        self.sentences += len(labels)

    def _track(self, score: float, sentence: int, span, gold: set) -> None:
        start, end, kind = span
        same_words = [g for g in gold if g[0] == start and g[1] == end]
        overlap = [g for g in gold if g[0] < end and start < g[1]]
        truth = (same_words[0][2] if same_words else
                 ", ".join(f"{g[2]} (other boundaries)" for g in sorted(overlap)) if overlap else "O")
        item = (round(score, 6), sentence, start, end, kind, truth)
        if len(self.wrong) < self.top_wrong:
            heapq.heappush(self.wrong, item)
        else:
            heapq.heappushpop(self.wrong, item)

    def compute(self) -> dict:
        tp, fp, fn = (sum(x.values()) for x in (self.tp, self.fp, self.fn))
        precision, recall, f1 = prf(tp, fp, fn)
        types = sorted(set(self.tp) | set(self.fp) | set(self.fn))
        per_type = []
        for kind in types:
            p, r, f = prf(self.tp[kind], self.fp[kind], self.fn[kind])
            per_type.append({"label": kind, "precision": p, "recall": r, "f1": f,
                             "support": self.tp[kind] + self.fn[kind], "predicted": self.tp[kind] + self.fp[kind]})
        words = int(self.confusion.sum())
        return {
            "loss": self.loss_sum / max(self.loss_count, 1),
            "f1": f1, "precision": precision, "recall": recall,
            "f1_macro": sum(r["f1"] for r in per_type) / len(per_type) if per_type else 0.0,
            "token_accuracy": float(self.confusion.trace()) / words if words else 0.0,
            "examples": self.sentences, "words": words, "entities": tp + fn, "predicted_entities": tp + fp,
            "per_class": per_type,
            "confusion_matrix": self.confusion.tolist(),
            "confidently_wrong": [{"index": s, "span": [a, b], "label": truth, "predicted": kind, "confidence": score}
                                  for score, s, a, b, kind, truth in sorted(self.wrong, reverse=True)],
        }
