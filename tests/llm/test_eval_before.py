"""train.eval_before (the starting weights evaluated as step 0, before -> after in the summary),
causal-lm's generation before and after, the verifiable skill, and gradient checkpointing's auto rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lmkit import corpus_text, make_lm, make_tokenizer, reverse_task, write_jsonl
from tuneforge import finetune
from tuneforge.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from synth import synth_trainer  # noqa: E402


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    make_lm(path, make_tokenizer(path, corpus_text()))
    return path


def _recipe(lm_dir, tmp_path, **generation) -> dict:
    train = [{**r, "source": "reverse"} for r in reverse_task(120, 1)]
    val = [{**r, "source": "reverse" if i % 2 else "other-task"} for i, r in enumerate(reverse_task(12, 2))]
    return {"model": {"name": str(lm_dir)},
            "task": {"type": "causal-lm", "max_length": 64,
                     "generation": {"eval_prompts": 4, "max_new_tokens": 6, "sampled": False, **generation}},
            "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", train)),
                     "validation": str(write_jsonl(tmp_path / "val.jsonl", val))},
            "strategy": {"name": "lora", "rank": 8},
            "train": {"max_steps": 6, "eval_every": 3, "lr": 5e-3, "batch_size": 8, "progress": False,
                      "precision": "fp32"},
            "output": {"dir": str(tmp_path / "run"), "report": False}}


# --------------------------------------------------------------------------- the default and the loop

def test_eval_before_defaults_on_for_generative_tasks_only(lm_dir):
    assert load_recipe({"model": {"name": str(lm_dir)}, "task": {"type": "causal-lm"}}).train.eval_before is True
    assert load_recipe({}).train.eval_before is False  # text classification: a new head starts at chance
    assert load_recipe({"train": {"eval_before": True}}).train.eval_before is True
    off = load_recipe({"model": {"name": str(lm_dir)}, "task": {"type": "causal-lm"}, "train": {"eval_before": False}})
    assert off.train.eval_before is False


def test_step_zero_is_evaluated_once_and_never_the_best():
    trainer = synth_trainer(n=12, batch_size=4, eval_before=True, eval_every=3, max_steps=6)
    state = trainer.fit()
    steps = [e["step"] for e in state.evals]
    assert steps == [0, 3, 6]
    assert state.evals[0]["loss"] > state.evals[-1]["loss"]  # the start is worse: a meaningful baseline
    # a resumed run restores its evaluations (step 0 among them) and does not evaluate the start again
    again = synth_trainer(n=12, batch_size=4, eval_before=True, eval_every=3, max_steps=9)
    again.state.evals, again.state.step = list(state.evals), 6
    again.fit()
    assert [e["step"] for e in again.state.evals] == [0, 3, 6, 9]
    # off: no step 0
    assert [e["step"] for e in synth_trainer(n=12, batch_size=4, eval_every=3, max_steps=6).fit().evals] == [3, 6]


# --------------------------------------------------------------------------- a causal-lm run

def test_causal_lm_run_reports_before_and_after(lm_dir, tmp_path):
    run = finetune(_recipe(lm_dir, tmp_path, group_by="source"))
    events = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    final = json.loads((run.path / "eval.json").read_text())
    assert final["before"]["loss"] == pytest.approx(evals[0]["loss"])
    assert final["best_step"] in (3, 6)  # a trained step, never the start
    assert final["validation"]["loss"] < final["before"]["loss"]  # 6 LoRA steps on the reverse task learn
    assert not (run.path / "checkpoints" / "step-00000000").exists()  # nothing to resume at step 0
    # generation before and after, side by side, overall and per group (group_by: source)
    gen = final["generation"]
    assert set(gen["before"]) >= {"prompts", "greedy", "groups"} and gen["before"]["prompts"] == gen["prompts"] == 8
    assert set(gen["groups"]) == set(gen["before"]["groups"]) == {"reverse", "other-task"}
    assert all(g["prompts"] == 4 for g in gen["groups"].values())
    rows = [json.loads(line) for line in (run.path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all("greedy_before" in r and r["group"] in gen["groups"] for r in rows)
    before_rows = [json.loads(line) for line in (run.path / "generations-before.jsonl").read_text().splitlines()]
    assert [r["greedy"] for r in before_rows] == [r["greedy_before"] for r in rows]
    from tuneforge.evaluation.report import write_report

    page = write_report(run.path).read_text()  # the report shows both: the metrics and the generation scores
    assert "validation before (step 0)" in page and "reverse" in page and ">before<" in page


def test_summary_says_before_to_after_and_when_training_did_not_help():
    from tuneforge.run.finish import before_after

    final = {"metric_for_best": "loss", "best_step": 6, "before": {"loss": 2.0, "perplexity": 7.39},
             "validation": {"loss": 1.5, "perplexity": 4.48},
             "generation": {"prompts": 4, "greedy": {"exact_match": 0.75}, "before": {"greedy": {"exact_match": 0.0}}}}
    lines = before_after(final, minimize=True)
    assert "loss 2.0000 -> 1.5000" in lines[0] and "perplexity 7.3900 -> 4.4800" in lines[0]
    assert "exact_match 0 -> 0.75" in lines[1]
    assert not any("did not improve" in line for line in lines)
    final["validation"] = {"loss": 2.1, "perplexity": 8.2}
    assert "did not improve validation loss" in before_after(final, minimize=True)[-1]


def test_classifier_run_without_eval_before_has_no_step_zero(tiny_bert_dir, tmp_path):
    rows = [{"text": t, "label": y} for t, y in [("good fun", "pos"), ("bad boring", "neg")] * 12]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    recipe = {"model": {"name": str(tiny_bert_dir)}, "data": {"train": str(path), "validation": str(path)},
              "strategy": {"name": "linear-probe"}, "train": {"epochs": 1, "batch_size": 8, "progress": False},
              "output": {"dir": str(tmp_path / "run"), "report": False}}
    run = finetune(recipe)
    assert "before" not in run.metrics and [e["step"] for e in run.history] == [3]
    run = finetune({**recipe, "train": {**recipe["train"], "eval_before": True},
                    "output": {**recipe["output"], "dir": str(tmp_path / "run2")}})
    assert [e["step"] for e in run.history] == [0, 3] and "accuracy" in run.metrics["before"]


# --------------------------------------------------------------------------- the verifiable skill

def test_skill_rows_are_seeded_disjoint_and_scored_exactly(tmp_path):
    from tuneforge.llm.generation import text_scores
    from tuneforge.llm.skills import exact_match, make_sft_data, skill_rows

    train, held = skill_rows(150, 30, seed=3)
    assert (train, held) == skill_rows(150, 30, seed=3) and train != skill_rows(150, 30, seed=4)[0]
    assert len(train) == 150 and len(held) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for r in held:
        answer = json.loads(r["reply"])
        assert set(answer) == {"name", "age", "city"} and isinstance(answer["age"], int)
        assert answer["name"] in r["prompt"] and answer["city"] in r["prompt"] and str(answer["age"]) in r["prompt"]
    ref = held[0]["reply"]
    assert exact_match(f"  {ref}\n", ref)
    assert not exact_match(f"```json\n{ref}\n```", ref) and not exact_match(f"Here it is: {ref}", ref)
    assert not exact_match(ref.replace('"age": ', '"age": "', 1), ref)
    assert text_scores([ref, "nope"], [ref, ref])["exact_match"] == 0.5  # the run's scorer agrees
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": f"say {i}", "input": "NoInput" if i % 2 else "x", "output": str(i)}
                                  for i in range(20)]))
    counts = make_sft_data(alpaca, tmp_path / "out", holdout=5, skill_train=10, skill_eval=4)
    assert counts["train"] == 25 and counts["validation"] == 9
    records = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "json-extract" for r in records) == 10
    assert not any("NoInput" in r["messages"][0]["content"] for r in records)  # "no input" placeholders dropped


# --------------------------------------------------------------------------- gradient checkpointing: auto

def test_gradient_checkpointing_auto_rule(lm_dir):
    from types import SimpleNamespace

    from tuneforge.speed.model import Checkpointing, activation_bytes, checkpointing_pays

    gb = 2**30
    assert checkpointing_pays(3 * gb, 10 * gb)[0] is True  # more than a quarter of what is free
    assert checkpointing_pays(2 * gb, 10 * gb)[0] is False
    assert checkpointing_pays(2 * gb, None)[0] is False
    from tuneforge.models import load_model
    from tuneforge.tasks.causal_lm import CausalLM

    loaded = load_model(str(lm_dir), causal_lm=True)
    model = CausalLM(loaded.backbone, loaded.lm_head)
    cfg = loaded.backbone.config

    def job(batch, length, choice="auto", amp=torch.bfloat16):
        return SimpleNamespace(model=model, task=SimpleNamespace(modality="text", max_length=length),
                               cfg=SimpleNamespace(batch_size=batch, gradient_checkpointing=choice),
                               amp_dtype=amp, device=torch.device("cpu"), log=lambda m: None)

    assert activation_bytes(job(4, 64)) == 34 * 4 * 64 * cfg.hidden_size * cfg.num_hidden_layers
    assert activation_bytes(job(4, 64, amp=None)) == 2 * activation_bytes(job(4, 64))  # fp32 keeps twice the bytes
    assert Checkpointing().applies(job(4, 64)) == (False, "")  # a tiny model: off, nothing to say
    assert Checkpointing().applies(job(4, 64, choice=True))[0] is True
    assert Checkpointing().applies(job(10**7, 10**4))[0] is True  # activations beyond any machine's memory: on
    assert load_recipe({"train": {"gradient_checkpointing": True}}).train.gradient_checkpointing is True
    assert load_recipe({}).train.gradient_checkpointing == "auto"


# --------------------------------------------------------------------------- ChatML-style templates whose EOS is <|im_end|>

def test_smollm2_style_template_masks_the_separator_and_adds_no_second_bos(tmp_path):
    """SmolLM2's tokenizer: BOS <|im_start|>, EOS <|im_end|>, a Jinja template writing
    "<|im_end|>\\n" after each turn. The newline is the template's, not the model's to learn."""
    from tuneforge.llm.templates import IGNORE, Template

    jinja = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = make_tokenizer(tmp_path, corpus_text(), chat_template=jinja)
    tok.bos_token, tok.eos_token = "<|im_start|>", "<|im_end|>"
    chat = [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"},
            {"role": "user", "content": "reverse dge"}, {"role": "assistant", "content": "egd"}]
    ids, labels = Template("tokenizer", tok).encode(Template("tokenizer", tok).render(chat))
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "cba<|im_end|>egd<|im_end|>"
    for name in ("chatml", "none"):
        text = Template(name, tok).render(chat).text if name == "chatml" else Template(name, tok).render(
            [{"role": "user", "content": Template("tokenizer", tok).prompt(chat[:1])}, chat[1]]).text
        assert text.startswith("<|im_start|>") and not text.startswith("<|im_start|><|im_start|>"), (name, text)
