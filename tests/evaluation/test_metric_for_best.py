"""metric_for_best picks the checkpoint and drives early stopping, for any reported metric."""

from __future__ import annotations

import json

import pytest

import tuneforge
from helpers import text_recipe, write_text_csv


def _evals(run):
    return [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]


@pytest.mark.parametrize("metric", ["f1_macro", "ece"])
def test_best_checkpoint_follows_metric(metric, tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=48)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                                         train={"epochs": 4, "metric_for_best": metric, "eval_every": 2,
                                                "lr": 3e-3}))
    evals = _evals(run)
    values = [e[metric] for e in evals]
    best = min(values) if metric == "ece" else max(values)
    assert run.metrics["best_step"] == evals[values.index(best)]["step"]  # the first step reaching the best
    final = json.loads((run.path / "eval.json").read_text())["validation"]
    assert final[metric] == pytest.approx(best, abs=1e-6)  # the saved model is that checkpoint
    for key in ("precision_micro", "recall_weighted", "roc_auc", "ece", "calibration", "per_class"):
        assert key in final, key
    assert sum(r["support"] for r in final["per_class"]) == final["examples"]
    for item in final["confidently_wrong"]:  # each names its row and carries its text
        assert item["label"] != item["predicted"] and item["where"].startswith("train.csv") and item["text"]


def test_early_stopping_on_a_minimised_metric(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=48)
    # lr 0: nothing changes, so the loss never improves after the first evaluation
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                                         train={"epochs": 10, "eval_every": 1, "lr": 1e-12, "head_lr": 1e-12,
                                                "metric_for_best": "loss",
                                                "early_stopping": {"patience": 2, "min_delta": 0.01}}))
    assert [e["step"] for e in _evals(run)] == [1, 2, 3]
    assert run.metrics["best_step"] == 1
