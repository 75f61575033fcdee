"""Forgetting: sequential tasks forget more under `full` than under `lora`; drift needs no
labels; `retain.max_drop` keeps the best checkpoint inside the budget."""

from __future__ import annotations

import json
import random

import pytest
import torch

import tuneforge
from helpers import FILLER, NEG, POS, text_recipe, write_text_csv
from tuneforge.errors import TuneforgeError
from tuneforge.evaluation.forgetting import linear_cka, mean_cosine
from tuneforge.recipe import recipe_from_dict


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)  # rotation, isotropic scale, shift
    assert linear_cka(x, torch.randn(64, 16, generator=g)) < 0.5  # unrelated features
    assert mean_cosine(x, x) == pytest.approx(1.0) and mean_cosine(x, -x) == pytest.approx(-1.0)


def _task_b(path):
    """Task B needs other features than sentiment: long vs short texts."""
    rng = random.Random(3)
    rows = ["text,label"]
    for i in range(80):
        words = rng.sample(FILLER, 3) + [rng.choice(POS + NEG)] + (rng.sample(FILLER, 3) if i % 2 == 0 else [])
        rng.shuffle(words)
        rows.append(" ".join(words) + "," + ("long" if i % 2 == 0 else "short"))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def sequence(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forget")
    a_val = write_text_csv(tmp / "a_val.csv", n=40, seed=1)
    a = tuneforge.finetune(text_recipe(tiny_bert_dir, write_text_csv(tmp / "a.csv", n=80), tmp / "A", "full",
                                       train={"epochs": 8, "lr": 3e-3}, output={"report": False}))
    runs = {}
    for strategy in ("full", "lora"):
        runs[strategy] = tuneforge.finetune(text_recipe(
            tiny_bert_dir, _task_b(tmp / "b.csv"), tmp / f"B-{strategy}", strategy,
            train={"epochs": 4, "lr": 3e-3, "eval_every": 10},
            retain={"data": str(a_val), "label_column": "label", "head_from": str(a.path)},
            output={"report": False}), init_from=str(a.path))
    return a, runs, tmp


@pytest.mark.slow  # ~25 s on a free 2-core CPU: three tiny-BERT runs in sequence
def test_sequential_full_forgets_more_than_lora(sequence):
    a, runs, _ = sequence
    full, lora = (runs[s].metrics["forgetting"] for s in ("full", "lora"))
    assert full["before"]["accuracy"] >= 0.85  # A's head on A's held-out data, before B
    assert full["before"] == lora["before"]  # the same starting model
    assert full["at_best"]["retain_accuracy_drop"] > 0.1  # full fine-tuning on B forgot A
    assert lora["at_best"]["retain_accuracy_drop"] < full["at_best"]["retain_accuracy_drop"]
    assert lora["at_best"]["retain_cka"] > full["at_best"]["retain_cka"]  # and drifted less
    for run in runs.values():  # B itself was learned either way; every evaluation was measured
        assert run.metrics["validation"]["accuracy"] >= 0.75  # chance is 0.5
        evals = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        assert all("retain_accuracy_drop" in e and "retain_cka" in e for e in evals)


@pytest.mark.slow
def test_max_drop_keeps_the_best_checkpoint_within_budget(sequence, tiny_bert_dir):
    a, runs, tmp = sequence
    history = runs["full"].metrics["forgetting"]["history"]
    budget = sorted(h["forgetting"] for h in history)[1]  # at least two evaluations fit (same seed: same run)
    run = tuneforge.finetune(text_recipe(
        tiny_bert_dir, tmp / "b.csv", tmp / "B-budget", "full", train={"epochs": 4, "lr": 3e-3, "eval_every": 10},
        retain={"data": str(tmp / "a_val.csv"), "label_column": "label", "head_from": str(a.path),
                "max_drop": budget}, output={"report": False}), init_from=str(a.path))
    f = run.metrics["forgetting"]
    assert f["budget_met"] and f["at_best"]["forgetting"] <= budget
    within = [h for h in f["history"] if h["forgetting"] <= budget]
    evals = {json.loads(x)["step"]: json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x}
    assert run.metrics["best_step"] == max(within, key=lambda h: (evals[h["step"]]["accuracy"], -h["step"]))["step"]


def test_drift_without_labels(tiny_bert_dir, tmp_path):
    retain = tmp_path / "general.csv"
    retain.write_text("text\n" + "\n".join(f"the film was {w}" for w in POS + NEG + FILLER) + "\n")
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, write_text_csv(tmp_path / "t.csv", n=24), tmp_path / "r",
                                         "linear-probe", train={"max_steps": 3}, retain={"data": str(retain)}))
    f = run.metrics["forgetting"]
    assert f["at_best"]["retain_cka"] == pytest.approx(1.0, abs=1e-6)  # a frozen backbone does not drift
    assert f["examples"] == len(POS + NEG + FILLER) and "linear CKA" in f["measure"]


def test_retain_options_are_checked():
    with pytest.raises(TuneforgeError, match="need retain.data"):
        recipe_from_dict({"retain": {"max_drop": 0.1}})
    with pytest.raises(TuneforgeError, match="retain.label_column"):
        recipe_from_dict({"retain": {"data": "x.csv", "head_from": "runs/a"}})


def test_best_checkpoint_respects_the_budget(monkeypatch, tmp_path):
    """The selection rule alone, on made-up evaluations (fast)."""
    from types import SimpleNamespace

    import tuneforge.engine.callbacks as callbacks

    saved = []
    monkeypatch.setattr(callbacks, "save_checkpoint", lambda path, model, meta, **_: saved.append(meta["step"]))
    best = callbacks.BestCheckpoint(tmp_path, "accuracy", minimize=False)
    trainer = SimpleNamespace(state=SimpleNamespace(step=0, epoch_float=0.0, last_improved=False, best_metric=None,
                                                    best_step=None), model=None, optimized_names=None)
    evals = [(1, 0.6, 0.30, False), (2, 0.7, 0.20, False),  # over budget: keep the least forgetting
             (3, 0.65, 0.05, True),                          # first within budget wins over any over it
             (4, 0.9, 0.50, False),                          # better accuracy, over budget: ignored
             (5, 0.8, 0.08, True)]                           # within budget and better: the best
    for step, acc, forgetting, ok in evals:
        trainer.state.step = step
        best.on_eval_end(trainer, {"accuracy": acc, "forgetting": forgetting, "within_forgetting_budget": ok})
    assert saved == [1, 2, 3, 5] and best.best_step == 5


def test_report_shows_forgetting(tiny_bert_dir, tmp_path):
    retain = tmp_path / "general.csv"
    retain.write_text("text\n" + "\n".join(f"the film was {w}" for w in POS + NEG) + "\n")
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, write_text_csv(tmp_path / "t.csv", n=24), tmp_path / "r",
                                         "full", train={"max_steps": 4, "eval_every": 2}, retain={"data": str(retain)},
                                         output={"report": True}))
    page = (run.path / "report.html").read_text()
    assert "<section id='forgetting'>" in page and (run.path / "report" / "forgetting.png").stat().st_size > 1000
    history = run.metrics["forgetting"]["history"]
    assert [h["step"] for h in history] == [2, 4] and all(h["retain_cka"] < 1.0 for h in history)
