"""`tuneforge.load(run).predict("one string")` is one prediction (not one per character), and
`tuneforge eval` prints train's table (labels as `predict` gives them), with the JSON in --out."""

from __future__ import annotations

import json

import pytest

from helpers import text_recipe, write_text_csv
from tuneforge import TuneforgeError, finetune, load
from tuneforge.cli import main


@pytest.fixture(scope="module")
def int_run(tiny_bert_dir, tmp_path_factory):
    """Integer labels (1 / 0): predictions and eval's labels come back as integers."""
    tmp = tmp_path_factory.mktemp("predictor_eval")
    train = write_text_csv(tmp / "train.csv", n=32, labels=(1, 0))
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 1})).path, train


def test_a_single_string_is_one_prediction(int_run):
    run, _ = int_run
    predictor = load(run)
    one = predictor.predict("good fun film")
    assert isinstance(one, dict) and one == predictor.predict(["good fun film"])[0]
    assert one["label"] in (0, 1)
    assert predictor.predict_proba("good fun film").shape == (1, 2)
    assert len(predictor.predict(("good", "bad", "film"))) == 3  # any iterable of inputs is a list
    with pytest.raises(TuneforgeError, match="one input .* or a list"):
        predictor.predict(42)


def test_eval_prints_the_table_and_writes_json(int_run, tmp_path, capsys):
    run, train = int_run
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(train), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)  # stdout: where the JSON is, as train prints the run path
    assert "accuracy" in captured.err and "per class" in captured.err
    assert len(captured.err.splitlines()) < 40  # a table, not ~300 lines of JSON
    metrics = json.loads(out.read_text())
    assert metrics["examples"] == 32 and sum(map(sum, metrics["confusion_matrix"])) == 32
    assert metrics["labels"] == [0, 1]  # as predict returns them
    assert [row["label"] for row in metrics["per_class"]] == [0, 1]
    assert all(row["label"] in (0, 1) and row["predicted"] in (0, 1) for row in metrics["confidently_wrong"])

    assert main(["eval", str(run), "--data", str(train), "--out", "-"]) == 0  # the JSON on stdout, for pipes
    assert json.loads(capsys.readouterr().out)["labels"] == [0, 1]
