"""token-classification end to end through the CLI on a tiny BERT, for every strategy that
applies to an encoder: train -> eval -> predict -> serve -> export (ONNX, parity-checked),
plus cross-validation and compare. Each run is a few seconds; the checks are numeric."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tagging_helpers import tagger_bert_dir, tagging_recipe, write_conll, write_span_jsonl  # noqa: F401 (fixture)
from tuneforge.cli import main

TEXTS = ["Mary went to New York today.", "John Smith works for Acme Corp and Ann met with Londoners today."]

# strategy -> (strategy options, train overrides); together they cover the vocabulary, the LoRA
# family (DoRA, rsLoRA) and the discriminative rates (lr_range, layer_decay) on top of full / partial
STRATEGIES = {
    "full": ({}, {"lr_range": [3e-3, 1e-2]}),
    "partial": ({"layers": 1}, {"layer_decay": 0.8}),
    "linear-probe": ({}, {"lr": 2e-2}),
    "gradual-unfreeze": ({}, {"epochs": 4}),
    "lora": ({"rank": 4}, {"lr": 1e-2}),  # with output.merge: folded into the weights, saved plainly
    "lora-dora": ({"rank": 4, "dora": True, "rslora": True}, {"lr": 1e-2}),
    "adapters": ({}, {"lr": 1e-2}),
    "ia3": ({}, {"lr": 2e-2}),
    "prompt-tuning": ({"virtual_tokens": 4}, {"lr": 2e-2}),
    "prefix-tuning": ({"virtual_tokens": 4}, {"lr": 2e-2}),
    "bitfit": ({}, {"lr": 2e-2}),
    "auto": ({}, {}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    return write_conll(root / "train.txt", n=48, seed=0), write_conll(root / "dev.txt", n=16, seed=1), root


def _train(tmp_path, recipe: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path)])
    return code, capsys.readouterr()


def _same_predictions(got: list[dict], expected: list[dict]) -> None:
    for g, e in zip(got, expected, strict=True):
        assert [(x["label"], x["start"], x["end"]) for x in g["entities"]] == \
            [(x["label"], x["start"], x["end"]) for x in e["entities"]]
        assert [t["score"] for t in g["tokens"]] == pytest.approx([t["score"] for t in e["tokens"]], abs=1e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_train_eval_predict_serve_export(name, tagger_bert_dir, data, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from tuneforge import load
    from tuneforge.deploy.serve import create_app

    train, dev, _ = data
    strategy, overrides = STRATEGIES[name]
    run = tmp_path / "run"
    recipe = tagging_recipe(tagger_bert_dir, train, run, name.split("-dora")[0], validation=dev, strategy=strategy,
                            train=overrides, output={"merge": name == "lora"})
    code, out = _train(tmp_path, recipe, capsys)
    assert code == 0, out.err
    if name == "lora":
        assert "merge: max |merged - unmerged| logit =" in out.err
        assert json.loads((run / "model" / "tuneforge.json").read_text())["layout"] == "hf-backbone+head"
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    final = json.loads((run / "eval.json").read_text())["validation"]
    labels = json.loads((run / "model" / "labels.json").read_text())["names"]
    assert labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert final["loss"] < math.log(len(labels))  # it learnt something: below the uniform guess
    assert {"f1", "precision", "recall", "token_accuracy"} <= set(final) and final["examples"] == 16
    if name in ("full", "lora", "partial"):
        assert final["f1"] > 0.5, final

    code = main(["eval", str(run), "--data", str(dev), "--out", "-"])
    metrics = json.loads(capsys.readouterr().out)
    assert code == 0 and metrics["f1"] == pytest.approx(final["f1"]) and metrics["words"] == final["words"]

    code = main(["predict", str(run), *TEXTS])
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(preds) == 2
    for text, p in zip(TEXTS, preds):
        assert all(text[e["start"]:e["end"]] == e["text"] for e in p["entities"])
        assert [t["text"] for t in p["tokens"]][:2] in (["Mary", "went"], ["John", "Smith"])

    expected = load(run).predict(TEXTS)
    _same_predictions(preds, expected)
    with TestClient(create_app(run)) as client:
        r = client.post("/v1/predict", json={"inputs": TEXTS})
        assert r.status_code == 200, r.text
        _same_predictions(r.json()["predictions"], expected)

    code = main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert code == 0 and report["check"] == "passed" and report["max_abs_diff"] < 1e-3


def test_onnx_graph_takes_other_lengths_and_safetensors_reloads(tagger_bert_dir, data, tmp_path, capsys):
    import onnxruntime as ort

    from tuneforge import load

    train, dev, _ = data
    run = tmp_path / "run"
    code, out = _train(tmp_path, tagging_recipe(tagger_bert_dir, train, run, validation=dev), capsys)
    assert code == 0, out.err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    pre = json.loads((tmp_path / "onnx" / "preprocessing.json").read_text())
    assert pre["task_settings"]["subtokens"] == "first" and pre["outputs"] == ["logits"]
    predictor = load(run)
    batch = predictor.task.encode_inputs(["Ann saw Rome", TEXTS[1]])  # lengths the export never saw
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})[0]
    with torch.no_grad():
        ref = predictor.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert torch.allclose(torch.from_numpy(got)[mask], ref[mask], atol=1e-4)
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    capsys.readouterr()
    _same_predictions(load(tmp_path / "st").predict(TEXTS), predictor.predict(TEXTS))
    code = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert code != 0 and "scores every token — use --format onnx" in capsys.readouterr().err


def test_span_jsonl_long_sentences_windowed_and_report(tagger_bert_dir, tmp_path, capsys):
    """Character-span data, windows of 12 sub-tokens (every 3-clause sentence is cut), the report's
    per-type table and confidently wrong spans."""
    train = write_span_jsonl(tmp_path / "train.jsonl", n=40)
    dev = write_conll(tmp_path / "dev.txt", n=12, seed=3, clauses=(3,))
    run = tmp_path / "run"
    code, out = _train(tmp_path, tagging_recipe(tagger_bert_dir, train, run, validation=dev,
                                                task={"max_length": 12, "stride": 4}, train={"epochs": 2},
                                                output={"report": True}), capsys)
    assert code == 0, out.err
    assert "validation: 12 sentence(s) longer than 10 sub-tokens are read in windows overlapping by 4" in out.err
    final = json.loads((run / "eval.json").read_text())["validation"]
    assert final["words"] == sum(1 for line in dev.read_text().splitlines() if line.strip() and "DOCSTART" not in line)
    page = (run / "report.html").read_text()
    assert "Per-class metrics" in page and "<td class='l'>PER</td>" in page
    for item in final["confidently_wrong"]:
        assert "[[" in item["text"] and item["where"].startswith("dev.txt line")
    long_text = " and ".join(["John Smith went to New York"] * 4) + " today ."
    assert main(["predict", str(run), long_text]) == 0
    pred = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [t["text"] for t in pred["tokens"]] == long_text.split()  # every word of every window, once


def test_cross_validation_and_compare(tagger_bert_dir, data, tmp_path, capsys):
    train, dev, _ = data
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tagging_recipe(tagger_bert_dir, train, tmp_path / "unused",
                                                    train={"epochs": 1})))
    assert main(["cv", str(recipe), "--folds", "2", "--output", str(tmp_path / "cv")]) == 0
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert summary["summary"]["validation"]["f1"]["n"] == 2
    fold = (tmp_path / "cv" / "folds" / "fold-1" / "train.jsonl").read_text().splitlines()
    assert set(json.loads(fold[0])) == {"tokens", "tags"}
    sizes = [f["validation_examples"] for f in summary["per_fold"]]
    assert sum(sizes) == 48
    capsys.readouterr()
    assert main(["compare", str(recipe), "--strategies", "full,lora", "--in-process",
                 "--output", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "f1" in [c.strip() for c in table.splitlines()[0].split("|")]
    rows = list(__import__("csv").DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["f1"] for r in rows)
