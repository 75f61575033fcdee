"""Issue 22, data damage: `predict --out` and `export --out` never destroy what they were not
asked to write. Each case checks the victim's sha256 before and after."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import text_recipe, write_text_csv
from tuneforge import TuneforgeError, finetune
from tuneforge.cli import main
from tuneforge.deploy.export import export_run


@pytest.fixture(scope="module")
def run(tiny_bert_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("guards")
    train = write_text_csv(tmp / "train.csv", n=32)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 1})).path


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(root: Path) -> dict:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_predict_refuses_an_output_that_is_an_input(run, tmp_path, capsys):
    victim = write_text_csv(tmp_path / "in.csv", n=6)
    before = _sha(victim)
    os.link(victim, tmp_path / "hard.csv")
    (tmp_path / "soft.csv").symlink_to(victim)
    for out in (victim, tmp_path / "hard.csv", tmp_path / "soft.csv", tmp_path / "." / "in.csv"):
        assert main(["predict", str(run), "--file", str(victim), "--out", str(out)]) == 2
        assert "is the input file" in capsys.readouterr().err
        assert _sha(victim) == before
    # a run's own files are not outputs either
    manifest = _sha(run / "manifest.json")
    assert main(["predict", str(run), "--file", str(victim), "--out", str(run / "manifest.json")]) == 2
    assert "file of the run" in capsys.readouterr().err and _sha(run / "manifest.json") == manifest
    # positional inputs (image paths) are protected the same way
    from tuneforge.deploy.predict import check_output

    with pytest.raises(TuneforgeError, match="is the input file"):
        check_output(victim, ["a text", str(victim)])
    # a proper output: written whole, through a temporary file that is gone afterwards
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), "--file", str(victim), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6 and not list(tmp_path.glob(".*.tmp"))
    assert _sha(victim) == before


def test_export_never_replaces_a_run_or_a_folder_that_is_not_an_export(run, tmp_path):
    before = _tree(run.parent)
    for out in (run, run / "model", run / "checkpoints", run.parent):
        with pytest.raises(TuneforgeError, match="run"):
            export_run(run, "safetensors", out, overwrite=True, log=lambda *_: None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(TuneforgeError, match="not an earlier export.*even with --overwrite"):
        export_run(run, "safetensors", mine, overwrite=True, log=lambda *_: None)
    assert _tree(run.parent) == before and (mine / "notes.txt").read_text() == "keep me"
    # an earlier export is what --overwrite replaces
    export_run(run, "safetensors", tmp_path / "exp", log=lambda *_: None)
    with pytest.raises(TuneforgeError, match="--overwrite"):
        export_run(run, "safetensors", tmp_path / "exp", log=lambda *_: None)
    report = export_run(run, "safetensors", tmp_path / "exp", overwrite=True, log=lambda *_: None)
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["check"] == report["check"] == "passed"
    assert _tree(run.parent) == before
