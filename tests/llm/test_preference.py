"""Preference tuning (DPO, SimPO) on the tiny random-init Llama of ``tuneforge make-tiny-lm``:
for "reverse abc =", prefer " cba" over the reply that does not stop, " cba cba"."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helpers import simulate_crash
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.llm.tiny import make_tiny_lm, write_jsonl
from tuneforge.tasks.preference import REFERENCE_FILE, PreferenceTask, reference_model, sequence_logps

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "dpo-tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, and the first 48 / 16 of its preference pairs (kept small for speed)."""
    model = make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
    return {"model": model,
            "train": write_jsonl(model / "pref-train.jsonl", _pairs(model / "dpo-train.jsonl")[:48]),
            "validation": write_jsonl(model / "pref-val.jsonl", _pairs(model / "dpo-val.jsonl")[:16])}


def _recipe(tiny, out, strategy="full", task=None, train=None, **sections):
    return {"model": {"name": str(tiny["model"])},
            "task": {"type": "preference", "max_length": 64, "generation": {"eval_prompts": 0}, **(task or {})},
            "data": {"train": str(tiny["train"]), "validation": str(tiny["validation"])},
            "strategy": {"name": strategy},
            "train": {"max_steps": 12, "eval_every": 3, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                      "progress": False, **(train or {})},
            "output": {"dir": str(out), "report": False}, **sections}


def _pairs(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def hf_reply_logps(model_dir, pairs: list[dict]) -> torch.Tensor:
    """(N, 2) summed log-probs of the chosen and rejected replies (+ EOS), computed directly with
    transformers from full logits: an independent check of the encoding and of ``sequence_logps``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for p in pairs:
            start = len(tok(tok.bos_token + p["prompt"], add_special_tokens=False)["input_ids"])
            row = []
            for side in ("chosen", "rejected"):
                ids = tok(tok.bos_token + p["prompt"] + p[side] + tok.eos_token, add_special_tokens=False)["input_ids"]
                logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, V)
                row.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
            out.append(row)
    return torch.tensor(out)


def _evals(run_path) -> list[dict]:
    lines = [json.loads(x) for x in (Path(run_path) / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == "eval"]


def test_dpo_loss_falls_and_reward_accuracy_rises(tiny, tmp_path):
    run = finetune(_recipe(tiny, tmp_path / "run", "full"))
    evals = _evals(run.path)
    assert [e["step"] for e in evals] == [0, 3, 6, 9, 12]  # 0: the starting weights (train.eval_before)
    base, first, last = evals[0], evals[1], evals[-1]
    # before any step the policy is the reference: loss ln 2, every reward 0 (no pair "correct")
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-4) and base["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert last["loss"] < first["loss"] < math.log(2)
    assert last["reward_margin"] > first["reward_margin"] > 0
    assert last["reward_accuracy"] >= 0.9 and last["chosen_reward"] > last["rejected_reward"]
    assert run.metrics["validation"]["reward_accuracy"] >= 0.9
    # full fine-tuning: the cached reference is the initial model's log-probs, from a pass before the first step
    cached = load_file(str(run.path / REFERENCE_FILE))
    assert cached["train"].shape == (48, 2) and cached["validation"].shape == (16, 2)
    expected = hf_reply_logps(tiny["model"], _pairs(tiny["validation"]))
    torch.testing.assert_close(cached["validation"], expected, atol=1e-4, rtol=1e-5)
    settings = json.loads((run.path / "manifest.json").read_text())["task_settings"]
    assert settings["reference"]["reused"] is False and settings["loss"] == "dpo"
    # the saved model loads as a generator, as a causal-lm run does
    from tuneforge.deploy.generator import Generator

    gen = Generator(run.path)
    assert isinstance(gen.task, PreferenceTask) and gen.task.template_name == "none"
    assert len(gen.complete(["reverse abc ="], max_new_tokens=4)) == 1


def test_simpo_learns_without_a_reference(tiny, tmp_path):
    from tuneforge.deploy.evaluate import evaluate_run

    run = finetune(_recipe(tiny, tmp_path / "run", "full", task={"loss": "simpo", "beta": 2.0}))
    evals = _evals(run.path)
    assert evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["reward_margin"] > evals[0]["reward_margin"]
    assert evals[-1]["reward_accuracy"] >= 0.9
    assert not (run.path / REFERENCE_FILE).exists()  # SimPO has no reference model
    # the saved model loads and scores the validation pairs as the trained model did
    again = evaluate_run(run.path, str(tiny["validation"]))
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert again[key] == pytest.approx(run.metrics["validation"][key], abs=1e-4)


def test_lora_reference_is_the_base_model_sharing_its_weights(tiny, tmp_path):
    from tuneforge.deploy.evaluate import evaluate_run
    from tuneforge.run.artifact import load_model_dir

    run = finetune(_recipe(tiny, tmp_path / "run", "lora", train={"lr": 1e-2}))
    base = hf_reply_logps(tiny["model"], _pairs(tiny["validation"]))
    torch.testing.assert_close(load_file(str(run.path / REFERENCE_FILE))["validation"], base, atol=1e-4, rtol=1e-5)

    model, task, labels, _ = load_model_dir(run.path)  # the trained adapters on the base model
    assert hasattr(model, "disable_adapter")
    dataset = task.dataset(task.read("validation", str(tiny["validation"]), limit=None, skipped=[]), labels,
                           "validation")
    storage = {p.data_ptr() for p in model.parameters()}
    with reference_model(model) as reference:
        assert reference is model  # no second copy: the policy with its adapters switched off
        assert {p.data_ptr() for p in reference.parameters()} == storage
    task.prepare_reference(model, {"validation": dataset}, torch.device("cpu"), contextlib.nullcontext,
                           tmp_path, lambda msg: None)
    torch.testing.assert_close(dataset.reference, base, atol=1e-4, rtol=1e-5)  # = the untrained base model
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    assert (policy.view(2, -1).T - base).abs().max() > 1e-2  # while the trained adapters do change it
    # `tuneforge eval` on new data: no cache, so the reference is computed inline, adapters disabled
    again = evaluate_run(run.path, str(tiny["validation"]))
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert again[key] == pytest.approx(run.metrics["validation"][key], abs=1e-4)


def test_resumed_run_reuses_the_reference_cache(tiny, tmp_path, monkeypatch):
    recipe = _recipe(tiny, tmp_path / "run", "full", train={"max_steps": 6, "eval_every": 2, "save_every": 2,
                                                           "keep_checkpoints": 5})
    recipe["output"]["keep_resumable"] = True  # for the crash below
    done = finetune(recipe)
    cache = done.path / REFERENCE_FILE
    written = cache.stat().st_mtime_ns
    simulate_crash(done.path, after_step=2)  # later checkpoints and the outputs never happened

    def recompute(*args, **kwargs):
        raise AssertionError("a resumed run recomputed the reference log-probs (now with trained weights?)")

    monkeypatch.setattr(PreferenceTask, "_reference_logps", recompute)
    out = io.StringIO()
    resumed = finetune(recipe, resume=str(done.path), console=Console(file=out, width=200))
    assert "reference log-probs reused" in out.getvalue() and cache.stat().st_mtime_ns == written
    assert resumed.metrics["validation"]["loss"] == pytest.approx(done.metrics["validation"]["loss"], abs=1e-6)


def test_reference_cache_is_keyed_by_weights_and_data(tiny, tmp_path):
    from tuneforge.models import load_model
    from tuneforge.recipe import load_recipe
    from tuneforge.tasks import get_task

    recipe = load_recipe(_recipe(tiny, tmp_path / "run"))
    task = get_task(recipe)
    loaded = load_model(str(tiny["model"]), causal_lm=True)
    task.attach(loaded)
    model = task.build_model(loaded, None)
    records = task.read("train", str(tiny["train"]), limit=16, skipped=[])
    notes = []

    def prepare(data):
        datasets = {"train": task.dataset(data, None, "train")}
        task.prepare_reference(model, datasets, torch.device("cpu"), contextlib.nullcontext, tmp_path, notes.append)
        return datasets["train"].reference

    first = prepare(records)
    assert torch.equal(prepare(records), first) and "reused" in notes[-1]
    assert first.shape == (16, 2) and "reused" not in notes[0]
    assert prepare(records[:8]).shape == (8, 2) and "reused" not in notes[-1]  # other data: computed again
    with torch.no_grad():
        model.backbone.norm.weight.mul_(2.0)  # other weights: another reference
    changed = prepare(records)
    assert "reused" not in notes[-1] and not torch.allclose(changed, first)


def test_pairs_carry_loss_on_the_replies_only(tiny, tmp_path):
    """Chat-form pairs: a multi-turn prompt's own assistant turn is context, not a target."""
    from tuneforge.models import load_model
    from tuneforge.recipe import load_recipe
    from tuneforge.tasks import get_task

    rows = [{"prompt": [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"},
                        {"role": "user", "content": "reverse bad"}],
             "chosen": [{"role": "assistant", "content": "dab"}],
             "rejected": [{"role": "assistant", "content": "dab dab"}]},
            {"prompt": "reverse fed =", "chosen": " def", "rejected": " fed"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = load_recipe(_recipe(tiny, tmp_path / "run"))
    task = get_task(recipe)
    loaded = load_model(str(tiny["model"]), causal_lm=True)
    task.attach(loaded)
    dataset = task.dataset(task.read("train", str(path), limit=None, skipped=[]), None, "train")
    assert task.template_name == "chatml"  # message lists: chat data (the tiny tokenizer has no template)
    tok = task.tokenizer

    def targets(ids, labels):
        return tok.decode([i for i, lab in zip(ids, labels) if lab != -100])

    assert targets(*dataset.pairs[0]["chosen"]) == "dab<|im_end|></s>"
    assert targets(*dataset.pairs[0]["rejected"]) == "dab dab<|im_end|></s>"
    assert targets(*dataset.pairs[1]["chosen"]) == " def<|im_end|></s>"
    batch = task.collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["num_examples"] == 2 and batch["index"].tolist() == [0, 1]
    rows = [targets(ids, labels) for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert rows[1:3] == [" def<|im_end|></s>", "dab dab<|im_end|></s>"]  # the chosen rows, then the rejected
    # before training the policy is its own reference: DPO loss ln 2 and zero rewards
    model = task.build_model(loaded, None)
    task.prepare_reference(model, {"train": dataset}, torch.device("cpu"), contextlib.nullcontext, tmp_path,
                           lambda msg: None)
    model.eval()
    with torch.no_grad():
        out = task.forward(model, task.collate([dataset[0], dataset[1]]))
    assert float(out["loss_sum"] / out["count"]) == pytest.approx(math.log(2), abs=1e-6)
    assert out["logits"][:, :2].abs().max() < 1e-5 and out["logits"].shape == (2, 4)  # rewards, then log-probs
    torch.testing.assert_close(out["logits"][:, 2:], out["logps"])
    # truncation keeps the prompt's start; a pair left without a reply token is dropped and counted
    start = [labels.index(next(x for x in labels if x != -100)) for _, labels in (p["chosen"] for p in dataset.pairs)]
    cut = start[1] + 2  # inside the second pair's reply, before the first pair's (multi-turn) reply begins
    assert cut <= start[0] and cut < len(dataset.pairs[1]["chosen"][0])
    task.max_length = cut
    short = task.dataset(task.read("train", str(path), limit=None, skipped=[]), None, "short")
    assert task.truncated["short"] == 2 and task.dropped["short"] == 1 and len(short) == 1
    ids, labels = short.pairs[0]["chosen"]
    assert ids == dataset.pairs[1]["chosen"][0][:cut] and labels[-2:] == ids[-2:]


def test_bad_record_names_the_line(tiny, tmp_path):
    rows = _pairs(tiny["train"])[:4]
    del rows[2]["rejected"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = _recipe(tiny, tmp_path / "run")
    recipe["data"]["train"] = str(train)
    with pytest.raises(TuneforgeError, match=r"train\.jsonl line 3: a preference record needs rejected"):
        finetune(recipe)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_dpo_tiny_recipe_runs(tiny, tmp_path, monkeypatch):
    """The shipped recipe, as its header runs it: `tuneforge make-tiny-lm tiny-lm` wrote ./tiny-lm."""
    from tuneforge.recipe import load_recipe

    (tmp_path / "tiny-lm").symlink_to(tiny["model"])
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPE, ["train.max_steps=4", "train.eval_every=2", "train.progress=false",
                                  "output.report=false", "task.generation.eval_prompts=2",
                                  "task.generation.max_new_tokens=4", "output.dir=out"])
    assert recipe.task.type == "preference" and recipe.strategy.name == "lora"
    run = finetune(recipe)
    assert run.metrics["validation"]["reward_accuracy"] >= 0.5 and run.metrics["generation"]["prompts"] == 2
    assert (run.path / REFERENCE_FILE).exists() and (run.path / "model" / "adapter").is_dir()
