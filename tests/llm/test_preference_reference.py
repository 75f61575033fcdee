"""DPO against a separate reference model (``task.reference``): an SFT run (its final model,
adapters merged) or a model directory, loaded once for its log-probs, then freed."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from test_preference import _pairs, _recipe, hf_reply_logps
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.llm.tiny import corpus_text, make_lm, make_tiny_lm, make_tokenizer, write_jsonl
from tuneforge.tasks.preference import REFERENCE_FILE, sequence_logps


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    model = make_tiny_lm(root / "tiny-lm")
    sft = finetune({"model": {"name": str(model)},
                    "task": {"type": "causal-lm", "max_length": 48, "generation": {"eval_prompts": 0}},
                    "data": {"train": str(model / "sft-train.jsonl"), "validation": str(model / "sft-val.jsonl"),
                             "max_train_rows": 96},
                    "strategy": {"name": "full"},
                    "train": {"max_steps": 8, "eval_every": 8, "batch_size": 8, "lr": 1e-2, "precision": "fp32",
                              "progress": False},
                    "output": {"dir": str(root / "sft"), "report": False}})
    return {"model": model, "sft": sft.path, "root": root,
            "train": write_jsonl(model / "pref-train.jsonl", _pairs(model / "dpo-train.jsonl")[:48]),
            "validation": write_jsonl(model / "pref-val.jsonl", _pairs(model / "dpo-val.jsonl")[:16])}


def test_the_sft_run_as_reference_is_what_the_loss_uses(tiny, tmp_path):
    from tuneforge.deploy.evaluate import evaluate_run
    from tuneforge.run.artifact import load_model_dir

    pairs = _pairs(tiny["validation"])
    sft_logps = hf_reply_logps(tiny["sft"] / "model" / "backbone", pairs)  # the SFT run's weights, by transformers
    base_logps = hf_reply_logps(tiny["model"], pairs)
    assert (sft_logps - base_logps).abs().max() > 0.5  # the two candidate references really differ

    out = io.StringIO()
    run = finetune(_recipe(tiny, tmp_path / "dpo", "lora", task={"reference": str(tiny["sft"])},
                           train={"max_steps": 3, "eval_every": 3, "lr": 1e-2}), console=Console(file=out, width=300))
    cached = load_file(str(run.path / REFERENCE_FILE))
    torch.testing.assert_close(cached["validation"], sft_logps, atol=1e-4, rtol=1e-5)  # not the policy's start
    log = out.getvalue()
    assert f"the model of run {tiny['sft']}" in log and "the reference model is freed" in log
    info = json.loads((run.path / "manifest.json").read_text())["task_settings"]["reference"]
    assert info["reused"] is False and str(tiny["sft"]) in info["model"]
    # the reference's own preference, reported as the "before" of the policy's raw metrics
    assert info["scores"]["validation"]["logp_accuracy"] == pytest.approx(
        float((sft_logps[:, 0] > sft_logps[:, 1]).float().mean()), abs=1e-4)

    # the loss and rewards use it: rewards = beta * (policy - SFT reference), on the reloaded run
    model, task, labels, _ = load_model_dir(run.path)
    dataset = task.dataset(task.read("validation", str(tiny["validation"]), limit=None, skipped=[]), labels,
                           "validation")
    task.prepare_reference(model, {"validation": dataset}, torch.device("cpu"), contextlib.nullcontext, tmp_path,
                           lambda msg: None)
    torch.testing.assert_close(dataset.reference, sft_logps, atol=1e-4, rtol=1e-5)
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].view(2, -1).T
        out = task.forward(model, batch)
    torch.testing.assert_close(out["logits"][:, :2], 0.1 * (policy - sft_logps), atol=1e-4, rtol=1e-4)
    # `tuneforge eval` on new data loads the separate reference itself
    again = evaluate_run(run.path, str(tiny["validation"]))
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_nll", "logp_accuracy"):
        assert again[key] == pytest.approx(run.metrics["validation"][key], abs=1e-4)


def test_lora_from_the_sft_run_against_it_learns_and_reloads(tiny, tmp_path):
    """The usual chain: the policy starts from the SFT run (--init-from) and the reference is that run."""
    from tuneforge.deploy.evaluate import evaluate_run

    run = finetune(_recipe(tiny, tmp_path / "dpo", "lora", task={"reference": str(tiny["sft"])},
                           train={"max_steps": 12, "eval_every": 3, "lr": 1e-2}), init_from=str(tiny["sft"]))
    evals = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["reward_margin"] == pytest.approx(0, abs=1e-4)  # policy = reference at the start
    assert evals[-1]["reward_accuracy"] >= 0.9 and evals[-1]["reward_margin"] > evals[1]["reward_margin"] > 0
    # reference = the starting policy here: the separate one equals the adapters-disabled warm start
    sft_logps = hf_reply_logps(tiny["sft"] / "model" / "backbone", _pairs(tiny["validation"]))
    torch.testing.assert_close(load_file(str(run.path / REFERENCE_FILE))["validation"], sft_logps, atol=1e-4,
                               rtol=1e-5)
    again = evaluate_run(run.path, str(tiny["validation"]))  # reloads onto the SFT weights (warm-start fix)
    assert again["loss"] == pytest.approx(run.metrics["validation"]["loss"], abs=1e-4)


def test_reference_cache_is_keyed_by_the_reference(tiny, tmp_path):
    from tuneforge.models import load_model
    from tuneforge.recipe import load_recipe
    from tuneforge.run.artifact import reference_loader
    from tuneforge.tasks import get_task

    notes, results = [], {}
    for name in ("sft", "sft again", "base"):
        spec = str(tiny["model"] if name == "base" else tiny["sft"])
        recipe = load_recipe(_recipe(tiny, tmp_path / "run", task={"reference": spec}))
        task = get_task(recipe)
        task.reference_source = reference_loader(spec)
        loaded = load_model(str(tiny["model"]), causal_lm=True)
        task.attach(loaded)
        datasets = {"validation": task.dataset(task.read("validation", str(tiny["validation"]), limit=None,
                                                         skipped=[]), None, "validation")}
        task.prepare_reference(task.build_model(loaded, None), datasets, torch.device("cpu"), contextlib.nullcontext,
                               tmp_path, notes.append)
        results[name] = datasets["validation"].reference
    assert "reused" not in notes[0] and "reused" in notes[2] and "reused" not in notes[3]
    assert torch.equal(results["sft"], results["sft again"]) and not torch.allclose(results["sft"], results["base"])


def test_a_bad_reference_is_a_clear_error(tiny, tmp_path):
    other = tmp_path / "other-lm"
    make_lm(other, make_tokenizer(other, corpus_text(), vocab_size=200))  # another tokenizer, another vocabulary
    with pytest.raises(TuneforgeError, match=r"task.reference .*tokenizer differs from the policy's \(261 vs 300 tokens; e\.g\. .* only in the policy's"):
        finetune(_recipe(tiny, tmp_path / "a", "lora", task={"reference": str(other)}))
    with pytest.raises(TuneforgeError, match="task.reference .*nope"):
        finetune(_recipe(tiny, tmp_path / "b", "lora", task={"reference": str(tmp_path / "nope")}))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    with pytest.raises(TuneforgeError, match="task.reference is DPO's reference model and task.loss is simpo"):
        finetune(_recipe(tiny, tmp_path / "d", "lora", task={"loss": "simpo", "reference": str(tiny["sft"])}))
