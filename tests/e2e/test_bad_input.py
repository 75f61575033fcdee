"""Bad input gets a clear error naming the file, the line/row and the fix, and
costs nothing already produced."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import finetune
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError


def test_missing_column_names_file_columns_and_key(tiny_bert_dir, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\ngood film,pos\nbad film,neg\n")
    with pytest.raises(TuneforgeError) as err:
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run"))
    text = str(err.value)
    assert "'text'" in text and "train.csv" in text and "sentence" in text and "data.text_column" in text
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_empty_file(tiny_bert_dir, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("")
    with pytest.raises(TuneforgeError, match="train.csv"):
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run"))


def test_validation_label_not_in_training(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    val = tmp_path / "val.csv"
    val.write_text("text,label\ngood film,pos\nmeh film,neutral\n")
    with pytest.raises(TuneforgeError) as err:
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", data={"validation": str(val)}))
    text = str(err.value)
    assert "val.csv line 3" in text and "neutral" in text and "training" in text


def test_per_split_column_override(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    val = tmp_path / "dev.tsv"
    val.write_text("label\tcontent\npos\tgood fun\nneg\tawful plot\n")
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1},
                               data={"validation": str(val), "columns": {"validation": {"text_column": "content"}}}))
    assert run.metrics["validation"]["examples"] == 2


def test_single_class_training_set(tiny_bert_dir, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"film {i},pos\n" for i in range(10)))
    with pytest.raises(TuneforgeError, match="single class"):
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", data={"validation_split": 0.2}))


def test_unreadable_image_names_file(tiny_timm_weights, tmp_path):
    train = write_image_folder(tmp_path / "train", n_per_class=4)
    (train / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(TuneforgeError) as err:
        finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run"))
    assert "broken.png" in str(err.value) and "on_bad_record" in str(err.value)


def test_unreadable_image_skipped_on_request(tiny_timm_weights, tmp_path):
    train = write_image_folder(tmp_path / "train", n_per_class=4)
    (train / "red" / "broken.png").write_bytes(b"")
    run = finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run", train={"epochs": 1},
                                data={"on_bad_record": "skip"}))
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert any("broken.png" in s for s in manifest["skipped"]["train"])
    assert manifest["examples"]["train"] + manifest["examples"]["validation"] == 8


def test_cli_reports_recipe_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lr": "fast", "bach_size": 3}}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.bach_size" in err and "did you mean 'batch_size'" in err and "Traceback" not in err
    bad.write_text(yaml.safe_dump({"train": {"lr": "fast"}}))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "'fast'" in err


def test_text_model_with_image_task_is_rejected_up_front(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "minilm-l6"}, "task": {"type": "image-classification"}}))
    assert main(["validate", str(recipe)]) == 2
    assert "text model" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    recipe = text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1})
    first = finetune(recipe)
    before = (first.path / "eval.json").read_text()
    with pytest.raises(TuneforgeError, match="already holds a run.*--overwrite"):
        finetune(recipe)
    assert (first.path / "eval.json").read_text() == before
    finetune(recipe, overrides=["output.overwrite=true"])


def test_missing_data_path(tiny_bert_dir, tmp_path):
    with pytest.raises(TuneforgeError, match="data.train path .*does not exist"):
        finetune(text_recipe(tiny_bert_dir, tmp_path / "nope.csv", tmp_path / "run"))
