"""`tuneforge.load(run).predict("one string")` is one prediction (not one per character)."""

from __future__ import annotations

import pytest

from helpers import text_recipe, write_text_csv
from tuneforge import TuneforgeError, finetune, load


@pytest.fixture(scope="module")
def int_run(tiny_bert_dir, tmp_path_factory):
    """Integer labels (1 / 0): predictions come back as integers."""
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

