"""`tuneforge cv`: stratified (or grouped) folds, one run each, and an honest summary."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from helpers import text_recipe, write_text_csv
from tuneforge.cli import main
from tuneforge.workflows.cv import cross_validate
from tuneforge.errors import TuneforgeError


FOLDS = (1, 2, 3)  # fold directories count from 1, as the log does


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cv_gives_k_runs_and_a_summary_of_their_means(tiny_bert_dir, tmp_path, capsys):
    train = write_text_csv(tmp_path / "train.csv", n=30)
    recipe = text_recipe(tiny_bert_dir, train, tmp_path / "unused", "full", train={"epochs": 1},
                         output={"report": True})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["cv", str(tmp_path / "r.yaml"), "--folds", "3", "--output", str(tmp_path / "cv")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "3-fold cross-validation, stratified" in out and "accuracy" in out and "±" in out
    cv = json.loads((tmp_path / "cv" / "cv.json").read_text())
    # one numbering: the log's "fold k/3" is the directory fold-k and cv.json's fold k (issue 22)
    for k in FOLDS:
        assert f"fold {k}/3" in captured.err
        assert cv["per_fold"][k - 1]["fold"] == k and Path(cv["per_fold"][k - 1]["run"]).name == f"fold-{k}"
    folds = [json.loads((tmp_path / "cv" / f"fold-{k}" / "eval.json").read_text())["validation"] for k in FOLDS]
    for key, s in cv["summary"]["validation"].items():
        values = [f[key] for f in folds if f.get(key) is not None]
        assert s["mean"] == pytest.approx(sum(values) / len(values), abs=1e-12), key
        assert s["std"] == pytest.approx(statistics.stdev(values), abs=1e-12), key
    # the validation parts are disjoint, cover every row once, and each keeps both classes
    vals = [_jsonl(tmp_path / "cv" / "folds" / f"fold-{k}" / "validation.jsonl") for k in FOLDS]
    texts = sorted(r["text"] for v in vals for r in v)
    assert len(texts) == 30 and sorted(texts) == sorted(x.rsplit(",", 1)[0] for x in train.read_text().splitlines()[1:])
    assert all({r["label"] for r in v} == {"pos", "neg"} for v in vals)
    for k in FOLDS:
        manifest = json.loads((tmp_path / "cv" / f"fold-{k}" / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["examples"]["validation"] == len(vals[k - 1])
    assert (tmp_path / "cv" / "report.html").exists()
    # the cv directory loads as the ensemble of its fold models: the mean of their probabilities
    import torch

    import tuneforge

    texts = ["good fun film", "bad awful plot", "the film"]
    ensemble = tuneforge.load(tmp_path / "cv")
    members = torch.stack([tuneforge.load(tmp_path / "cv" / f"fold-{k}").predict_proba(texts) for k in FOLDS])
    torch.testing.assert_close(ensemble.predict_proba(texts), members.mean(0))
    assert len(ensemble.meta["ensemble_of"]) == 3


def test_grouped_folds_keep_each_group_on_one_side(tiny_bert_dir, tmp_path):
    speaker = {f"r{i}": f"s{i % 6}" for i in range(36)}
    rows = ["id,text,label,speaker"] + [f"r{i},{'good fun' if i % 2 else 'awful plot'},{'pos' if i % 2 else 'neg'},"
                                         f"{speaker[f'r{i}']}" for i in range(36)]
    (tmp_path / "g.csv").write_text("\n".join(rows) + "\n")
    recipe = text_recipe(tiny_bert_dir, tmp_path / "g.csv", tmp_path / "unused", "linear-probe",
                         train={"epochs": 1}, data={"id_column": "id"}, output={"report": False})
    summary = cross_validate(recipe, folds=3, group_column="speaker", output=str(tmp_path / "cv"))
    held_out = []
    for k in FOLDS:
        folder = tmp_path / "cv" / "folds" / f"fold-{k}"
        val = {speaker[r["id"]] for r in _jsonl(folder / "validation.jsonl")}
        train = {speaker[r["id"]] for r in _jsonl(folder / "train.jsonl")}
        assert val and not val & train  # no speaker on both sides
        held_out += sorted(val)
    assert sorted(held_out) == sorted(set(speaker.values()))  # each speaker held out exactly once
    assert summary["grouped_by"] == "speaker" and len(summary["per_fold"]) == 3


def test_cv_refuses_a_class_that_cannot_be_trained_in_every_fold(tiny_bert_dir, tmp_path):
    rows = ["text,label"] + [f"good {i},pos" for i in range(10)] + [f"bad {i},neg" for i in range(10)] + ["meh,odd"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(TuneforgeError, match="odd.*fewer than 2 examples"):
        cross_validate(text_recipe(tiny_bert_dir, tmp_path / "t.csv", tmp_path / "x", "full"), folds=3,
                       output=str(tmp_path / "cv"))
