"""Tag schemes and entity metrics: conversion and repair, strict entities equal seqeval's,
the streaming metrics equal seqeval's scores, constrained decoding gives valid sequences."""

from __future__ import annotations

import random

import pytest
import torch

from tuneforge.data.tag_schemes import (allowed_transitions, detect_scheme, read_spans, strict_spans, subword_tags,
                                        tag_names, write_tags)
from tuneforge.errors import TuneforgeError
from tuneforge.evaluation.tagging import TaggingMetrics, decode

seqeval = pytest.importorskip("seqeval")  # in the dev extra; the agreement tests need the reference
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score  # noqa: E402
from seqeval.scheme import IOB2, IOBES, Entities  # noqa: E402

TYPES = ["PER", "LOC", "ORG"]


def _random_tags(rng: random.Random, scheme: str, n: int) -> list[str]:
    prefixes = "BIES" if scheme == "bioes" else "BI"
    return [rng.choice(["O", "O", *[f"{p}-{t}" for p in prefixes for t in TYPES]]) for _ in range(n)]


@pytest.mark.parametrize("scheme,reference", [("iob2", IOB2), ("bioes", IOBES)])
def test_strict_spans_equal_seqeval_on_random_sequences(scheme, reference):
    rng = random.Random(0)
    sequences = [_random_tags(rng, scheme, rng.randint(1, 12)) for _ in range(3000)]
    theirs = Entities(sequences, reference).entities
    for tags, expected in zip(sequences, theirs):
        assert strict_spans(tags, scheme) == [(e.start, e.end, e.tag) for e in expected], tags


@pytest.mark.parametrize("scheme,reference", [("iob2", IOB2), ("bioes", IOBES)])
@pytest.mark.parametrize("constrained", [False, True])
def test_streaming_metrics_equal_seqeval(scheme, reference, constrained):
    """Random word scores through TaggingMetrics in uneven batches == seqeval (strict) on the
    decoded sequences: micro P/R/F1 and every type's row."""
    torch.manual_seed(0)
    names = tag_names(TYPES, scheme)
    masks = allowed_transitions(names, scheme) if constrained else None
    metrics = TaggingMetrics(names, scheme, constrained=constrained)
    gold_all, pred_all = [], []
    rng = random.Random(1)
    for batch in range(12):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 7))]
        gold = [write_tags(read_spans(_random_tags(rng, scheme, n), scheme, repair=True)[0], n, scheme)
                for n in lengths]  # valid gold sequences, as the readers produce them
        logits = torch.randn(len(lengths), max(lengths), len(names)) * 3
        labels = torch.full((len(lengths), max(lengths)), -100)
        for b, g in enumerate(gold):
            labels[b, :len(g)] = torch.tensor([names.index(t) for t in g])
        metrics.update(logits, labels, index=torch.arange(len(lengths)))
        predicted = decode(logits, torch.tensor(lengths), masks)
        gold_all += gold
        pred_all += [[names[i] for i in predicted[b, :n].tolist()] for b, n in enumerate(lengths)]
    got = metrics.compute()
    kw = dict(mode="strict", scheme=reference, zero_division=0)
    assert got["precision"] == pytest.approx(precision_score(gold_all, pred_all, **kw))
    assert got["recall"] == pytest.approx(recall_score(gold_all, pred_all, **kw))
    assert got["f1"] == pytest.approx(f1_score(gold_all, pred_all, **kw))
    report = classification_report(gold_all, pred_all, output_dict=True, **kw)
    for row in got["per_class"]:
        assert row["f1"] == pytest.approx(report[row["label"]]["f1-score"])
        assert row["support"] == report[row["label"]]["support"]
    assert got["f1_macro"] == pytest.approx(report["macro avg"]["f1-score"])
    words = sum(len(g) for g in gold_all)
    same = sum(a == b for g, p in zip(gold_all, pred_all) for a, b in zip(g, p))
    assert got["token_accuracy"] == pytest.approx(same / words) and got["words"] == words
    if constrained:  # every predicted word is read into the entity it belongs to: strict == lenient
        for p in pred_all:
            assert strict_spans(p, scheme) == read_spans(p, scheme, repair=True)[0]


def test_confidently_wrong_spans_say_what_was_there():
    names = tag_names(["LOC", "PER"], "iob2")  # O B-LOC I-LOC B-PER I-PER
    logits = torch.full((1, 3, len(names)), -5.0)
    for w, tag in enumerate(["B-PER", "I-PER", "O"]):
        logits[0, w, names.index(tag)] = 5.0
    labels = torch.tensor([[names.index(t) for t in ("B-LOC", "O", "O")]])
    metrics = TaggingMetrics(names, "iob2")
    metrics.update(logits, labels, index=torch.tensor([7]))
    out = metrics.compute()
    (wrong,) = out["confidently_wrong"]
    assert wrong["index"] == 7 and wrong["span"] == [0, 2] and wrong["predicted"] == "PER"
    assert wrong["label"] == "LOC (other boundaries)" and wrong["confidence"] > 0.99
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["entities"] == 1


def test_detect_scheme():
    assert detect_scheme([["B-PER", "I-PER", "O", "B-LOC"]])[0] == "iob2"
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]])[0] == "iob1"
    assert detect_scheme([["S-PER", "O", "B-LOC", "E-LOC"]])[0] == "bioes"
    assert detect_scheme([["NN", "VBZ", "DT"]])[0] == "none"
    # an I- opening an entity beside B- openings: IOB2 with a mistake, not IOB1
    assert detect_scheme([["B-PER", "O", "I-LOC"]])[0] == "iob2"


@pytest.mark.parametrize("tags,scheme,spans", [
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "iob1", [(0, 2, "PER"), (2, 3, "PER"), (4, 5, "LOC")]),
    (["B-PER", "I-PER", "O", "B-LOC"], "iob2", [(0, 2, "PER"), (3, 4, "LOC")]),
    (["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], "bioes", [(0, 1, "PER"), (1, 4, "LOC")]),
    (["NN", "O", "VB"], "none", [(0, 1, "NN"), (2, 3, "VB")]),
])
def test_conversion_between_schemes(tags, scheme, spans):
    got, repaired = read_spans(tags, scheme, repair=False)
    assert got == spans and repaired == []
    for target in ("iob2", "bioes"):
        if scheme == "none":
            continue
        written = write_tags(got, len(tags), target)
        assert read_spans(written, target, repair=False)[0] == spans == strict_spans(written, target)
    if scheme == "iob1":
        assert write_tags(got, len(tags), "bioes") == ["B-PER", "E-PER", "S-PER", "O", "S-LOC"]
        assert write_tags(got, len(tags), "iob2") == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]


def test_invalid_tags_repaired_or_reported():
    tags = ["O", "I-PER", "I-PER", "O", "B-LOC", "I-ORG"]
    spans, repaired = read_spans(tags, "iob2", repair=True)
    assert spans == [(1, 3, "PER"), (4, 5, "LOC"), (5, 6, "ORG")]
    assert len(repaired) == 2 and "'I-PER' follows 'O'" in repaired[0]
    with pytest.raises(TuneforgeError, match=r"train.txt line 9: 'I-PER' follows 'O'.*task.on_invalid_tag: repair"):
        read_spans(tags, "iob2", repair=False, where=lambda i: f"train.txt line {8 + i}")
    with pytest.raises(TuneforgeError, match=r"not closed with E-"):
        read_spans(["B-PER", "O"], "bioes", repair=False)
    assert read_spans(["B-PER", "O"], "bioes", repair=True)[0] == [(0, 1, "PER")]
    with pytest.raises(TuneforgeError, match=r"tag 'PERSON' is neither O nor prefixed.*task.scheme: none"):
        read_spans(["PERSON"], "iob2", repair=True)
    with pytest.raises(TuneforgeError, match=r"BIOES prefix but task.scheme is iob2"):
        read_spans(["S-PER"], "iob2", repair=True)


def test_subword_tags_read_as_the_words_entity():
    assert subword_tags("B-PER", 3, "iob2") == ["B-PER", "I-PER", "I-PER"]
    assert subword_tags("S-PER", 3, "bioes") == ["B-PER", "I-PER", "E-PER"]
    assert subword_tags("E-PER", 2, "bioes") == ["I-PER", "E-PER"]
    assert subword_tags("S-PER", 1, "bioes") == ["S-PER"]
    assert subword_tags("O", 2, "iob2") == ["O", "O"] and subword_tags("NN", 2, "none") == ["NN", "NN"]
    # one word B-PER I-PER in pieces still reads as one PER entity in BIOES
    pieces = subword_tags("B-PER", 2, "bioes") + subword_tags("E-PER", 2, "bioes")
    assert strict_spans(pieces, "bioes") == [(0, 4, "PER")]
