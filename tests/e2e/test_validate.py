"""`tuneforge validate` checks what `tuneforge train` checks before the model loads, with the
run's own stages (issue 22): the data and where the run would go, writing nothing."""

from __future__ import annotations

import pytest
import yaml

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError


def _recipe_file(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_validate_reads_the_data_as_train_would(tiny_bert_dir, tmp_path, capsys):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    good = _recipe_file(tmp_path, text_recipe(tiny_bert_dir, train, tmp_path / "run"))
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out  # stdout: the verdict (stderr: the data's own lines, as train logs them)
    assert "valid (text-classification" in out and "data read: train 15, validation 5 examples" in out

    missing = _recipe_file(tmp_path, text_recipe(tiny_bert_dir, tmp_path / "nope.csv", tmp_path / "run"))
    assert main(["validate", str(missing)]) == 2
    assert "nope.csv' does not exist" in capsys.readouterr().err
    # a recipe written before its data exists: the schema alone, on request
    assert main(["validate", str(missing), "--no-data"]) == 0
    assert "recipe only" in capsys.readouterr().out

    misspelt = _recipe_file(tmp_path, text_recipe(tiny_bert_dir, train, tmp_path / "run", data={"text_column": "txet"}))
    assert main(["validate", str(misspelt)]) == 2
    err = capsys.readouterr().err
    assert "column 'txet' (text) not found in train.csv" in err and "did you mean 'text'" in err

    val = tmp_path / "val.csv"
    val.write_text("text,label\ngood film,pos\nmeh film,neutral\n")
    unknown = _recipe_file(tmp_path, text_recipe(tiny_bert_dir, train, tmp_path / "run", data={"validation": str(val)}))
    assert main(["validate", str(unknown)]) == 2
    assert "val.csv line 3: label 'neutral' does not occur in the training data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "--no-data" in capsys.readouterr().out


def test_validate_checks_the_output_dir_without_creating_or_locking_it(tiny_bert_dir, tmp_path, capsys):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    run = tmp_path / "run"
    path = _recipe_file(tmp_path, text_recipe(tiny_bert_dir, train, run, train={"max_steps": 1}))
    assert main(["validate", str(path)]) == 0 and not run.exists()  # nothing created for a new run
    finetune(yaml.safe_load(path.read_text()))
    before = sorted(p.name for p in run.iterdir())
    assert main(["validate", str(path)]) == 2  # as `train` would refuse it
    assert "already holds a run (completed)" in capsys.readouterr().err
    assert main(["validate", str(path), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == before and not (run / ".lock").exists()


def test_an_unknown_validation_label_fails_before_the_run_directory_exists(tiny_bert_dir, tmp_path, monkeypatch):
    """The labels of every split are read with the data, before the model loads (it used to be
    found when the datasets were built, after the run directory was made and the model loaded)."""
    import tuneforge.models as models

    train = write_text_csv(tmp_path / "train.csv", n=20)
    val = tmp_path / "val.csv"
    val.write_text("text,label\ngood film,pos\nmeh film,neutral\n")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(TuneforgeError, match=r"val.csv line 3: label 'neutral' does not occur in the training data"):
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", data={"validation": str(val)}))
    assert not (tmp_path / "run").exists()
