"""`auto`: the decision in synthetic situations, and that its reasons are printed and recorded."""

from __future__ import annotations

import json

import pytest

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.recipe import load_recipe
from tuneforge.strategies.auto import decide


def _facts(n, classes=2, params=22.7e6, device="cpu", modality="text", epochs=1):
    return {"train_examples": n, "classes": classes, "parameters": int(params), "device": device,
            "modality": modality, "train": {"epochs": epochs, "batch_size": 32}}


def _decide(facts, **options):
    return decide(load_recipe({"strategy": {"name": "auto", **options}}).strategy, facts)


def test_text_gives_partial_until_many_examples_per_class_then_full():
    for n in (100, 1000, 9998):  # below 5,000 per class (sst2-100 / sst2-1000 rows)
        d = _decide(_facts(n))
        assert d["chosen"] == "partial" and d["options"].name == "partial", n
    assert _decide(_facts(10000))["chosen"] == "full"  # 5,000 per class (sst2-10000 rows)
    assert _decide(_facts(10000, classes=20))["chosen"] == "partial"  # 500 per class


def test_images_need_steps_for_full_fine_tuning():
    # digits-100 / digits-500: a few steps -> partial
    assert _decide(_facts(100, classes=10, params=3.4e6, modality="image", epochs=3))["chosen"] == "partial"
    assert _decide(_facts(500, classes=10, params=3.4e6, modality="image", epochs=1))["chosen"] == "partial"
    # 1,437 images x 3 epochs = 135 steps: full (PERFORMANCE.md's 0.99 run); x 2 epochs = 90: not yet
    d = _decide(_facts(1437, classes=10, params=3.4e6, modality="image", epochs=3))
    assert d["chosen"] == "full" and d["facts"]["planned_steps"] == 135
    assert _decide(_facts(1437, classes=10, params=3.4e6, modality="image", epochs=2))["chosen"] == "partial"


def test_large_model_on_cpu_prefers_lora_but_not_on_gpu():
    assert _decide(_facts(10000, params=1.1e9))["chosen"] == "lora"
    assert _decide(_facts(10000, params=1.1e9, device="cuda:0"))["chosen"] == "full"


def test_budgets_rule_strategies_out_and_say_why():
    d = _decide(_facts(10000, epochs=3), time_budget_s=150)
    assert d["chosen"] == "partial" and "full" in d["ruled_out"] and "lora" in d["ruled_out"]
    assert "time budget 150 s" in d["ruled_out"]["full"] and "time budget" in d["paragraph"]
    assert d["estimates"]["partial"]["seconds"] <= 150 < d["estimates"]["full"]["seconds"]
    d = _decide(_facts(10000, params=400e6, device="cuda"), memory_budget_mb=12000)
    assert d["estimates"]["full"]["memory_mb"] > 12000 >= d["estimates"]["partial"]["memory_mb"]
    assert d["chosen"] == "partial" and "memory budget 12000 MB" in d["ruled_out"]["full"]
    d = _decide(_facts(10000), memory_budget_mb=10)  # nothing fits
    assert d["chosen"] == "linear-probe" and "cheapest" in d["paragraph"]


def test_candidates_restrict_the_choice_and_bad_ones_are_refused():
    assert _decide(_facts(100), candidates=["lora", "full"])["chosen"] == "full"
    with pytest.raises(TuneforgeError, match="auto chooses among"):
        _decide(_facts(100), candidates=["bitfit"])


def test_auto_run_prints_and_records_its_reasons(tiny_bert_dir, tmp_path):
    from rich.console import Console

    train = write_text_csv(tmp_path / "train.csv", n=24)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=400)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "auto", train={"epochs": 1}), console=console)
    console.file.close()
    log = (tmp_path / "log.txt").read_text()
    assert "auto: chose partial" in log and "18 labelled training examples in 2 classes" in log
    decision = json.loads((run.path / "manifest.json").read_text())["strategy_decision"]
    assert decision["chosen"] == "partial" and decision["facts"]["train_examples"] == 18
    assert any("examples per class" in r for r in decision["reasons"])
    assert json.loads((run.path / "model" / "tuneforge.json").read_text())["strategy"] == "partial"
    assert run.predict(["good fun"])[0]["label"] in ("pos", "neg")
