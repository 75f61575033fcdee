"""Seeded stratified splits and the offline digits demo set."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

from tuneforge.data.digits import materialise_digits
from tuneforge.data.images import read_image_records
from tuneforge.data.records import Record
from tuneforge.data.splits import label_counts, stratified_split
from tuneforge.errors import TuneforgeError


def recs(labels):
    return [Record({"label": y}, f"f line {i + 2}") for i, y in enumerate(labels)]


def lab(r):
    return r.values["label"]


def test_split_is_deterministic_stratified_and_ordered():
    data = recs(["a"] * 80 + ["b"] * 20)
    train, held = stratified_split(data, lab, 0.2, seed=1)
    assert (train, held) == stratified_split(data, lab, 0.2, seed=1)
    assert stratified_split(data, lab, 0.2, seed=2)[1] != held
    assert label_counts(held, lab) == {"a": 16, "b": 4}
    assert len(train) == 80 and set(map(id, train)).isdisjoint(map(id, held))
    assert train == sorted(train, key=data.index)  # original file order kept


def test_split_falls_back_with_warning_and_keeps_each_class_in_train():
    data = recs(["a"] * 10 + ["b"] * 10 + ["lonely"])
    with pytest.warns(UserWarning, match="lonely"):
        train, held = stratified_split(data, lab, 0.5, seed=0)
    assert set(label_counts(train, lab)) == {"a", "b", "lonely"}
    assert len(train) + len(held) == len(data)


def test_split_more_classes_than_held_out_slots():
    data = recs([str(i % 10) for i in range(20)])
    with pytest.warns(UserWarning, match="stratified split not possible"):
        train, held = stratified_split(data, lab, 0.1, seed=0)
    assert len(held) == 2 and set(label_counts(train, lab)) == {str(i) for i in range(10)}


def test_split_errors_and_multilabel():
    with pytest.raises(TuneforgeError, match="data.val_fraction"):
        stratified_split(recs(["a", "b"]), lab, 1.5, seed=0, hint="data.val_fraction")
    with pytest.raises(TuneforgeError, match="cannot split 1"):
        stratified_split(recs(["a"]), lab, 0.5, seed=0)
    data = recs([["x", "y"], ["y", "x"], ["z"], ["z"]] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, held = stratified_split(data, lab, 0.5, seed=0)
    assert len(held) == 6
    assert label_counts(data, lab) == {"x": 6, "y": 6, "z": 6}
    assert list(label_counts(recs(["b", 2, "a", 1]), lab)) == [1, 2, "a", "b"]


def test_materialise_digits_idempotent(tmp_path):
    root = tmp_path / "digits"
    info = materialise_digits(root, size=16)
    assert info["n_train"] + info["n_test"] == 1797 and info["n_test"] == 360
    test = read_image_records(info["test"])
    assert len(test) == 360 and Counter(r.values["label"] for r in test).keys() == {str(d) for d in range(10)}
    stamp = (root / "train" / "0" / "0000.png").stat().st_mtime_ns
    assert materialise_digits(root, size=16) == info  # same params: nothing rewritten
    assert (root / "train" / "0" / "0000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temp folders left behind
    assert materialise_digits(root, size=8, seed=1)["n_test"] == 360  # new params: rebuilt in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("keep me")
    with pytest.raises(TuneforgeError, match="not a tuneforge digits folder"):
        materialise_digits(tmp_path / "mine")
