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


def test_few_examples_per_class_gives_a_linear_probe():
    d = _decide(_facts(100))
    assert d["chosen"] == "linear-probe"
    assert d["options"].name == "linear-probe"
    # 100 examples but 20 classes: per class, still few
    assert _decide(_facts(1000, classes=20))["chosen"] == "linear-probe"


def test_enough_examples_gives_full_fine_tuning():
    assert _decide(_facts(1000))["chosen"] == "full"
    assert _decide(_facts(10000))["chosen"] == "full"


def test_large_model_on_cpu_prefers_lora_but_not_on_gpu():
    assert _decide(_facts(10000, params=1.1e9))["chosen"] == "lora"
    assert _decide(_facts(10000, params=1.1e9, device="cuda:0"))["chosen"] == "full"


def test_budgets_rule_strategies_out_and_say_why():
    d = _decide(_facts(10000, epochs=3), time_budget_s=60)
    assert d["chosen"] not in ("full", "lora") and "full" in d["ruled_out"]
    assert "time budget 60 s" in d["ruled_out"]["full"] and "time budget" in d["paragraph"]
    d = _decide(_facts(10000, params=400e6, device="cuda"), memory_budget_mb=5000)
    assert d["estimates"]["full"]["memory_mb"] > 5000 and d["chosen"] != "full"
    d = _decide(_facts(10000), memory_budget_mb=10)  # nothing fits
    assert d["chosen"] == "linear-probe" and "cheapest" in d["paragraph"]


def test_candidates_restrict_the_choice_and_bad_ones_are_refused():
    assert _decide(_facts(100), candidates=["lora", "full"])["chosen"] == "lora"
    with pytest.raises(TuneforgeError, match="auto chooses among"):
        _decide(_facts(100), candidates=["bitfit"])


def test_auto_run_prints_and_records_its_reasons(tiny_bert_dir, tmp_path):
    from rich.console import Console

    train = write_text_csv(tmp_path / "train.csv", n=24)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=400)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "auto", train={"epochs": 1}), console=console)
    console.file.close()
    log = (tmp_path / "log.txt").read_text()
    assert "auto: chose linear-probe" in log and "18 labelled training examples in 2 classes" in log
    decision = json.loads((run.path / "manifest.json").read_text())["strategy_decision"]
    assert decision["chosen"] == "linear-probe" and decision["facts"]["train_examples"] == 18
    assert any("examples per class" in r for r in decision["reasons"])
    assert json.loads((run.path / "model" / "tuneforge.json").read_text())["strategy"] == "linear-probe"
    assert run.predict(["good fun"])[0]["label"] in ("pos", "neg")
