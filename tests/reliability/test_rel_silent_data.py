"""Issue 22 -- silently wrong training data: inputs that used to train without a word.

Each case goes through ``read_data`` (the stage that reads and checks every split, before any
model is loaded or anything is written), or the task's ``attach``, and checks what the run
now says or refuses. The error cases also run end to end in ``test_rel_bad_input.py``'s table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.recipe import load_recipe
from tuneforge.run.build import read_data
from tuneforge.run.job import Job


def _read(tmp_path: Path, train: str, name: str = "train.csv", val: str | None = None,
          **data) -> tuple[Job, list[str]]:
    path = tmp_path / name
    path.write_text(train)
    if val is not None:  # a validation file: nothing held out at random
        (tmp_path / f"val{path.suffix}").write_text(val)
        data["validation"] = str(tmp_path / f"val{path.suffix}")
    lines: list[str] = []
    job = Job(load_recipe({"model": {"name": "unused"}, "task": {"type": "text-classification"},
                           "data": {"train": str(path), "validation_split": 0.25, **data}}), log=lines.append)
    read_data(job)
    return job, lines


def _csv(*rows: str) -> str:
    return "text,label\n" + "\n".join(rows) + "\n"


VAL_JSONL = '{"text": "a new film", "label": 1}\n{"text": "an old film", "label": 0}\n'
FILMS = ["good film", "bad film", "great film", "awful film", "fun film", "dull film", "loved it", "hated it"]


def test_labels_that_differ_only_by_surrounding_whitespace_are_one_class(tmp_path):
    labels = ["pos", "neg", "pos ", " neg", "pos", "neg ", " pos", "neg"]  # 4 classes before
    job, lines = _read(tmp_path, _csv(*(f'{t},"{lab}"' for t, lab in zip(FILMS, labels))))
    assert job.labels.names == ["neg", "pos"]
    assert any("labels (2): neg 3, pos 3" in line for line in lines), lines  # 6 left after the held-out 2


def test_numbers_spelt_differently_are_one_class(tmp_path):
    labels = ["1", "0", " 1", "0", "01", "0", "1", "00"]  # 1 / ' 1' / 01: 4 classes before
    job, lines = _read(tmp_path, _csv(*(f"{t},{lab}" for t, lab in zip(FILMS, labels))),
                       val=_csv("a new film,1", "an old film,0"))
    assert job.labels.names == ["0", "1"] and job.labels.kind == "int"
    summary = next(line for line in lines if "labels (2)" in line)
    assert "labels (2): 0 4, 1 4; '1' / '01' are one label ('1')" in summary, summary
    assert "'0' / '00' are one label ('0')" in summary
    assert job.labels.id("01", "x") == job.labels.id(" 1", "x") == job.labels.id(1, "x") == 1


def test_nan_labels_are_bad_records_and_1_0_is_1(tmp_path):
    labels = ["1.0", "0", "nan", "0", "1", "0", "1.0", "0"]  # 1.0 / nan / 1 / 0: 3-4 classes before
    body = _csv(*(f"{t},{lab}" for t, lab in zip(FILMS, labels)))
    with pytest.raises(TuneforgeError, match=r"train\.csv line 4: column 'label' holds 'nan', a missing-value "
                                             r"marker.*data\.on_bad_record: skip"):
        _read(tmp_path, body)
    job, lines = _read(tmp_path, body, on_bad_record="skip")
    assert job.labels.names == ["0", "1"] and len(job.skipped["train"]) == 1
    assert any("skipped 1 bad train record(s)" in line and "train.csv line 4" in line for line in lines)


def test_jsonl_labels_of_mixed_types_are_refused_and_equal_numbers_merge(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in zip(FILMS, [1, 0, "1", 0, 1.0, 0, True, 0])]  # 5 classes before
    with pytest.raises(TuneforgeError) as e:
        _read(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), name="train.jsonl", val=VAL_JSONL)
    msg = str(e.value)
    assert "train.jsonl line 7: the label true is a boolean, but train.jsonl line 1 has 1, a number" in msg, msg
    assert "write every label the same way" in msg
    rows[6]["label"] = 1
    job, _ = _read(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), name="train.jsonl", val=VAL_JSONL)
    assert job.labels.names == ["0", "1"] and job.labels.kind == "int"


def test_the_label_set_and_counts_are_printed_before_training(tmp_path):
    labels = ["pos", "neg", "pos", "pos", "neutral", "pos", "neg", "pos"] * 2
    _, lines = _read(tmp_path, _csv(*(f"{t} {i},{lab}" for i, (t, lab) in enumerate(zip(FILMS * 2, labels)))),
                     val=_csv("a new film,pos"))
    assert any(line.endswith("labels (3): pos 10, neg 4, neutral 2") for line in lines), lines


def test_train_equal_to_validation_warns_with_the_overlap_count(tmp_path):
    body = _csv(*(f"{t},{'pos' if i % 2 == 0 else 'neg'}" for i, t in enumerate(FILMS)))
    (tmp_path / "train.csv").write_text(body)
    job, lines = _read(tmp_path, body, validation=str(tmp_path / "train.csv"))
    warning = next(line for line in lines if "shares" in line)
    assert "validation shares 8 of its 8 rows with train (data.validation and data.train are the same file)" in warning
    with pytest.raises(TuneforgeError, match="set data.allow_overlap: true"):
        _read(tmp_path, body, validation=str(tmp_path / "train.csv"), allow_overlap=False)


def test_a_max_length_beyond_the_model_is_capped_with_a_log_line(tiny_bert_dir):
    from tuneforge.models import load_model
    from tuneforge.tasks import get_task

    loaded = load_model(str(tiny_bert_dir))
    recipe = load_recipe({"model": {"name": str(tiny_bert_dir)},
                          "task": {"type": "text-classification", "max_length": 100000}, "data": {"train": "x"}})
    task, lines = get_task(recipe), []
    task.attach(loaded, log=lines.append)
    assert task.max_length == 64 and lines == ["[yellow]task.max_length 100000 capped at 64[/]: the most tokens "
                                               "this model takes"]
