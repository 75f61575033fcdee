from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.cli import main


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    train = write_text_csv(tmp / "train.csv", n=40)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 6, "lr": 3e-3})), train


def test_models_lists_aliases(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm-l6" in out and "efficientnet-lite0" in out


def test_eval_on_new_file_streams_metrics(text_run, tmp_path, capsys):
    run, _ = text_run
    held_out = write_text_csv(tmp_path / "new.csv", n=20, seed=7)
    assert main(["eval", str(run.path), "--data", str(held_out), "--out", "-"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == 20 and 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"])) == 20


def test_eval_with_renamed_columns(text_run, tmp_path, capsys):
    run, _ = text_run
    f = tmp_path / "dev.tsv"
    f.write_text("label\tcontent\npos\tgood fun\nneg\tawful plot\n")
    out = tmp_path / "eval.json"
    assert main(["eval", str(run.path), "--data", str(f), "--text-column", "content", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["examples"] == 2


def test_predict_file_to_jsonl(text_run, tmp_path, capsys):
    run, train = text_run
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run.path), "--file", str(train), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and rows[0]["id"] == "train.csv line 2"


def test_python_api_run_object(text_run):
    import tuneforge

    run, _ = text_run
    assert run.path.is_dir() and run.metrics["validation"]["accuracy"] >= 0.0
    assert tuneforge.load(run.path).predict(["good fun"]) == run.predict(["good fun"])
    assert set(tuneforge.__all__) >= {"finetune", "load", "Recipe", "load_recipe"}


def test_command_line_entry_point(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # --no-data: the shipped recipe reads ../shared/data, which a clean clone (CI) does not have
    out = subprocess.run([sys.executable, "-m", "tuneforge", "validate", "recipes/sst2-minilm.yaml", "--show", "--no-data"],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout and "max_train_rows: 8000" in out.stdout


def test_version(capsys):
    import tuneforge

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tuneforge {tuneforge.__version__}"
