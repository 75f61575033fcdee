"""Training guards: non-finite losses and out-of-memory errors end with advice, not a stack trace."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.tasks.base import ClassificationTask


@pytest.fixture
def poisoned(monkeypatch):
    """The loss turns NaN on every batch that holds training example 0."""
    real = ClassificationTask.forward

    def forward(self, model, batch):
        out = real(self, model, batch)
        if model.training and (batch["index"] == 0).any():
            out["loss_sum"] = out["loss_sum"] * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(ClassificationTask, "forward", forward)


def test_nonfinite_loss_stops_with_step_records_and_advice(poisoned, tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    with pytest.raises(TuneforgeError) as err:
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run"))
    text = str(err.value)
    assert "non-finite loss at step" in text and "train.csv line" in text
    assert "train.lr" in text and "fp32" in text and "on_nonfinite: skip" in text
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"


def test_nonfinite_batches_skipped_and_counted(poisoned, tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"on_nonfinite": "skip"}))
    manifest = json.loads((run.path / "manifest.json").read_text())
    skipped = manifest["skipped_nonfinite"]
    assert len(skipped) == 2  # one poisoned batch per epoch
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(str(run.path / "model" / "head.safetensors")).values())


def test_out_of_memory_names_the_settings(monkeypatch, tiny_bert_dir, tmp_path):
    def oom(self, model, batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(ClassificationTask, "forward", oom)
    train = write_text_csv(tmp_path / "train.csv", n=40)
    with pytest.raises(TuneforgeError) as err:
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run"))
    text = str(err.value)
    assert "out of memory" in text and "train.batch_size" in text and "train.grad_accum" in text and "lora" in text
