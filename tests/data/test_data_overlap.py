"""Rows shared between splits are counted by the hash of their input, warned about, or refused."""

from __future__ import annotations

import pytest

from tuneforge.data.overlap import check_overlap, input_digest
from tuneforge.data.records import Record
from tuneforge.errors import TuneforgeError


def recs(name: str, *texts: str, label: str = "pos") -> list[Record]:
    return [Record({"text": t, "label": label}, f"{name} line {i + 2}") for i, t in enumerate(texts)]


def test_overlap_is_counted_per_pair_of_splits_and_warned():
    splits = {"train": recs("train.csv", "a good film", "a bad film", "fun"),
              # relabelled and re-spaced, it is still the training row
              "validation": recs("val.csv", "a  good film ", "new one", label="neg"),
              "test": recs("test.csv", "fun", "new one", "unseen")}
    lines: list[str] = []
    found = check_overlap(splits, allow=True, log=lines.append)
    assert found == {"validation": {"train": 1}, "test": {"train": 1, "validation": 1}}
    assert len(lines) == 3
    assert "validation shares 1 of its 2 rows with train" in lines[0] and "val.csv line 2 = train.csv line 2" in lines[0]
    assert "data.allow_overlap: false makes this an error" in lines[0]
    assert check_overlap({"train": splits["train"], "validation": recs("v.csv", "x")}, allow=True,
                         log=lines.append) == {}


def test_same_file_for_train_and_validation_is_an_error_when_overlap_is_not_allowed():
    rows = recs("train.csv", "a", "b", "c", "d")
    with pytest.raises(TuneforgeError) as e:
        check_overlap({"train": rows, "validation": rows}, allow=False, log=print,
                      paths={"train": "train.csv", "validation": "train.csv"})
    msg = str(e.value)
    assert "validation shares 4 of its 4 rows with train (data.validation and data.train are the same file)" in msg
    assert "set data.allow_overlap: true" in msg


def test_the_digest_ignores_label_and_id_and_reads_any_input():
    assert input_digest({"text": "a b", "label": 1, "id": 7}) == input_digest({"text": " a   b", "label": 0})
    assert input_digest({"image": b"\x89PNG"}) != input_digest({"image": b"\x89PNH"})
    chat = {"format": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert input_digest(chat) == input_digest(dict(chat)) != input_digest({**chat, "format": "text"})
