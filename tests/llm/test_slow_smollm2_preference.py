"""SFT -> DPO on real weights (SmolLM2-135M-Instruct), a few steps each: the DPO run starts from
the SFT run and uses it as its reference; the result reloads onto the SFT weights and still
answers. `make test-slow`; the model is the `smollm2-135m` alias, or the local copy named by
TUNEFORGE_SMOLLM2 (a Hugging Face directory)."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from tuneforge import finetune

pytestmark = pytest.mark.slow
MODEL = os.environ.get("TUNEFORGE_SMOLLM2", "smollm2-135m")
FACTS = [("What is the capital of France?", "The capital of France is Paris."),
         ("What is the capital of Italy?", "The capital of Italy is Rome."),
         ("What is the capital of Spain?", "The capital of Spain is Madrid."),
         ("What is the capital of Germany?", "The capital of Germany is Berlin."),
         ("What is 2 + 2?", "2 + 2 = 4."), ("What is 3 + 5?", "3 + 5 = 8."),
         ("Name a primary colour.", "Red is a primary colour."), ("What colour is the sky?", "The sky is blue.")]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_then_dpo_from_it_against_it(tmp_path):
    from tuneforge.deploy.evaluate import evaluate_run
    from tuneforge.deploy.generator import Generator
    from tuneforge.run.artifact import load_model_dir, reference_loader
    from tuneforge.tasks.preference import REFERENCE_FILE
    from safetensors.torch import load_file

    sft_rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
              "rejected": [{"role": "assistant", "content": "I don't know."}]} for q, a in FACTS]
    common = {"train": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "lr": 3e-4, "progress": False,
                        "precision": "fp32"},
              "output": {"report": False}, "strategy": {"name": "lora", "rank": 8}}
    sft = finetune({"model": {"name": MODEL}, **common, "output": {"dir": str(tmp_path / "sft"), "report": False},
                    "task": {"type": "causal-lm", "max_length": 96, "generation": {"eval_prompts": 0}},
                    "data": {"train": _write(tmp_path / "sft.jsonl", sft_rows),
                             "validation": _write(tmp_path / "sft-val.jsonl", sft_rows[:4])}})
    dpo = finetune({"model": {"name": MODEL}, **common, "output": {"dir": str(tmp_path / "dpo"), "report": False},
                    "task": {"type": "preference", "max_length": 96, "reference": str(sft.path),
                             "generation": {"eval_prompts": 0}},
                    "data": {"train": _write(tmp_path / "pairs.jsonl", pairs),
                             "validation": _write(tmp_path / "pairs-val.jsonl", pairs[:4])}}, init_from=str(sft.path))
    # the reference is the SFT run's model: its log-probs, computed with that model loaded on its own
    model, task, labels, _ = load_model_dir(dpo.path)
    ref, tokenizer, _ = reference_loader(str(sft.path))()
    dataset = task.dataset(task.read("validation", str(tmp_path / "pairs-val.jsonl"), limit=None, skipped=[]),
                           labels, "validation")
    task.reference_source = lambda: (ref, tokenizer, "sft")
    task.prepare_reference(model, {"validation": dataset}, torch.device("cpu"), contextlib.nullcontext, tmp_path,
                           lambda msg: None)
    cached = load_file(str(dpo.path / REFERENCE_FILE))["validation"]
    torch.testing.assert_close(cached, dataset.reference, atol=1e-3, rtol=1e-4)
    # ... which is also where the policy started: with the adapters disabled it is the SFT model
    from tuneforge.tasks.preference import reference_model, sequence_logps

    batch = task.collate([dataset[i] for i in range(len(dataset))])
    with reference_model(model) as start, torch.no_grad():
        at_start = sequence_logps(start, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    torch.testing.assert_close(at_start.view(2, -1).T, dataset.reference, atol=1e-3, rtol=1e-4)
    # the saved DPO run reloads onto the SFT weights (warm-start fix) and still answers
    again = evaluate_run(dpo.path, str(tmp_path / "pairs-val.jsonl"))
    assert again["loss"] == pytest.approx(dpo.metrics["validation"]["loss"], abs=1e-4)
    reply = Generator(dpo.path).reply([{"role": "user", "content": "What is the capital of France?"}],
                                      max_new_tokens=16)
    assert "Paris" in reply
