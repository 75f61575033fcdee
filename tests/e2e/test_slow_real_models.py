"""Real packaged weights on real data (minutes on 2 cores): `make test-slow`."""

from __future__ import annotations

import pytest

from helpers import write_text_csv

pytestmark = pytest.mark.slow


def test_demo_digits_reaches_high_accuracy(tmp_path):
    from tuneforge.workflows.demo import run_demo

    run = run_demo(data_dir=str(tmp_path / "data"), output=str(tmp_path / "run"),
                   extra=["train.epochs=2", "train.progress=false"])
    assert run.metrics["test"]["accuracy"] >= 0.9
    assert (run.path / "model" / "model.safetensors").exists()


def test_minilm_lora_on_small_text(tmp_path):
    import tuneforge

    train = write_text_csv(tmp_path / "train.csv", n=200)
    run = tuneforge.finetune({
        "model": {"name": "minilm-l6"},
        "data": {"train": str(train)},
        "strategy": {"name": "lora"},
        "train": {"epochs": 2, "lr": 1e-3, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    })
    assert run.metrics["validation"]["accuracy"] >= 0.9
    assert tuneforge.load(run.path).predict(["a good fun film"])[0]["label"] == "pos"
