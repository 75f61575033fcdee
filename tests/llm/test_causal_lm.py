"""The causal-lm task: templates and loss masking, packing, training, generation, saving."""

from __future__ import annotations

import json

import pytest
import torch

from lmkit import corpus_text, make_lm, make_tokenizer, reverse_task, write_jsonl
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.llm.formats import read_lm_records
from tuneforge.llm.packing import pack
from tuneforge.llm.templates import IGNORE, Template

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse abc"},
        {"role": "assistant", "content": "cba"}, {"role": "user", "content": "reverse dge"},
        {"role": "assistant", "content": "egd"}]
# A ChatML-style Jinja template like those shipped with Qwen tokenizers (without EOS at the turn end).
JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), corpus_text(), chat_template=JINJA)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """family -> a tiny model directory, built once for the module."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"lm_{family}")
            make_lm(made[family], make_tokenizer(made[family], corpus_text()), family=family)
        return made[family]
    return get


@pytest.fixture(params=["llama", "gpt2"])
def lm_dir(request, lm_dirs):
    return lm_dirs(request.param)


def _trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


# --------------------------------------------------------------------------- templates and masking

@pytest.mark.parametrize("name", ["chatml", "llama", "tokenizer"])
def test_template_round_trips_ends_with_eos_and_masks_prompts(tok, name):
    template = Template(name, tok)
    rendered = template.render(CHAT)
    ids, labels = template.encode(rendered)
    assert tok.decode(ids) == rendered.text  # tokenising loses nothing
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert ids[trained[-1]] == tok.eos_token_id  # the last reply ends with EOS, and EOS is learned
    text = _trained_text(tok, ids, labels)
    assert "cba" in text and "egd" in text  # both replies carry loss ...
    for prompt_part in ("be brief", "reverse", "system", "user"):
        assert prompt_part not in text  # ... and nothing of the prompts does
    assert text.count(tok.eos_token) == 2 if name != "tokenizer" else text.endswith(tok.eos_token)
    # the generation prompt is exactly the conversation's text up to the reply
    prompt = template.prompt(CHAT[:3])
    assert rendered.text.startswith(prompt) and rendered.text[len(prompt):].startswith("cba")


def test_train_on_last_turn_and_all(tok):
    template = Template("chatml", tok)
    last = _trained_text(tok, *template.encode(template.render(CHAT, "last-turn")))
    assert "egd" in last and "cba" not in last
    ids, labels = template.encode(template.render(CHAT, "all"))
    assert sum(lab != IGNORE for lab in labels) == len(ids)


def test_prompt_completion_masks_the_prompt(tok):
    template = Template("none", tok)
    ids, labels = template.encode(template.render([{"role": "user", "content": "reverse abc ="},
                                                   {"role": "assistant", "content": " cba"}]))
    assert _trained_text(tok, ids, labels) == " cba" + tok.eos_token
    assert tok.decode(ids) == "<s>reverse abc = cba</s>"


# --------------------------------------------------------------------------- data formats

def test_formats_are_detected_and_bad_records_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": CHAT}, {"prompt": "p", "completion": "c"}, {"instruction": "do", "input": "", "output": "ok"},
        {"text": "plain words"}])
    records = read_lm_records(path)
    assert [r.values["format"] for r in records] == ["chat", "prompt-completion", "alpaca", "text"]
    assert "### Instruction:\ndo" in records[2].values["messages"][0]["content"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, {"question": "q", "answer": "a"}])
    with pytest.raises(TuneforgeError, match=r"bad.jsonl line 2.*fits none.*messages.*prompt.*instruction"):
        read_lm_records(bad)
    skipped = []
    assert len(read_lm_records(bad, on_bad_record="skip", skipped=skipped)) == 1 and "line 2" in skipped[0]
    with pytest.raises(TuneforgeError, match="message 1 must be"):
        read_lm_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]))
    (tmp_path / "t.txt").write_text("first doc\n\nsecond doc\n")
    assert [r.values["messages"][0]["content"] for r in read_lm_records(tmp_path / "t.txt")] == ["first doc", "second doc"]
    with pytest.raises(TuneforgeError, match=r"\.jsonl"):
        read_lm_records(tmp_path / "x.csv")


# --------------------------------------------------------------------------- packing

def test_packed_loss_equals_unpacked_loss(lm_dir):
    from tuneforge.models import load_model
    from tuneforge.tasks.causal_lm import CausalLM

    loaded = load_model(str(lm_dir), causal_lm=True)
    model = CausalLM(loaded.backbone, loaded.lm_head).eval()
    template = Template("none", loaded.tokenizer)
    examples = [template.encode(template.render([{"role": "user", "content": r["prompt"]},
                                                 {"role": "assistant", "content": r["completion"]}], "all"))
                for r in reverse_task(12, seed=3)]
    with torch.no_grad():
        one_by_one = sum(model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab]))[0] for ids, lab in examples)
        rows = pack(examples, max_length=40)
        assert len(rows) < len(examples)  # several examples share a row
        pad = loaded.tokenizer.pad_token_id
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad] * (longest - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [IGNORE] * (longest - len(r["labels"])) for r in rows])
        positions = torch.tensor([r["position_ids"] + [0] * (longest - len(r["position_ids"])) for r in rows])
        packed, n = model(input_ids=ids, position_ids=positions, labels=labels)
        # without the restarted positions (one long sequence, cross-example attention) it differs
        leaky, _ = model(input_ids=ids, labels=labels)
    assert int(n) == sum(sum(lab != IGNORE for lab in l[1:]) for _, l in examples)
    assert torch.allclose(packed, one_by_one, rtol=1e-4), (float(packed), float(one_by_one))
    assert not torch.allclose(leaky, one_by_one, rtol=1e-3)


# --------------------------------------------------------------------------- training end to end

def _recipe(lm_dir, tmp_path, strategy="full", **task):
    train = write_jsonl(tmp_path / "train.jsonl", reverse_task(160, 1))
    val = write_jsonl(tmp_path / "val.jsonl", reverse_task(16, 2))
    return {"model": {"name": str(lm_dir)},
            "task": {"type": "causal-lm", "max_length": 64, "generation": {"eval_prompts": 6, "max_new_tokens": 6},
                     **task},
            "data": {"train": str(train), "validation": str(val)}, "strategy": {"name": strategy},
            "train": {"epochs": 2, "lr": 5e-3, "batch_size": 8, "progress": False},
            "output": {"dir": str(tmp_path / "run"), "report": False}}


@pytest.mark.parametrize("family,strategy", [("llama", "full"), ("llama", "lora"), ("gpt2", "lora")])
def test_sft_learns_and_the_saved_run_generates_the_same(lm_dirs, tmp_path, family, strategy):
    from tuneforge.deploy.generator import Generator

    recipe = _recipe(lm_dirs(family), tmp_path, strategy)
    # fp32 on both sides: on a CPU with native bf16, `auto` trains and evaluates in bf16 while
    # Generator runs fp32, and a greedy token can flip between the two (seen on AMD Zen 4)
    recipe["train"]["precision"] = "fp32"
    run = finetune(recipe)
    evals = [e["loss"] for e in run.history]
    first = json.loads((run.path / "metrics.jsonl").read_text().splitlines()[0])
    assert evals[-1] < first.get("train_loss", first.get("loss", 99)), (evals, first)
    assert run.metrics["validation"]["perplexity"] > 1 and run.metrics["generation"]["prompts"] == 6
    manifest = json.loads((run.path / "manifest.json").read_text())
    packing = manifest["task_settings"]["packing"]["train"]
    assert packing["rows"] < packing["examples"] == 160
    rows = [json.loads(line) for line in (run.path / "generations.jsonl").read_text().splitlines()]
    again = Generator(run.path).complete([r["prompt"] for r in rows], raw=True, max_new_tokens=6)
    assert again == [r["greedy"] for r in rows]  # generation from the saved run = right after training


@pytest.mark.parametrize("strategy", ["prompt-tuning", "adapters"])
def test_prompt_tuning_and_adapters_train_a_causal_lm(lm_dirs, tmp_path, strategy):
    recipe = _recipe(lm_dirs("llama"), tmp_path, strategy)
    recipe["train"].update(max_steps=6, lr=3e-2)
    recipe["task"]["generation"]["eval_prompts"] = 2
    run = finetune(recipe)
    losses = [e["loss"] for e in run.history]
    assert run.metrics["validation"]["loss"] <= losses[0] and run.metrics["generation"]["prompts"] == 2
    if strategy == "prompt-tuning":  # virtual tokens in front of each row: no packing
        assert json.loads((run.path / "manifest.json").read_text())["task_settings"]["packing"] == {}


def test_causal_lm_refuses_encoders_and_classifier_strategies(tmp_path):
    from tuneforge.recipe import load_recipe

    with pytest.raises(TuneforgeError, match="decoder language model"):
        load_recipe({"model": {"name": "minilm-l6"}, "task": {"type": "causal-lm"}})
    with pytest.raises(TuneforgeError, match="keeps the model's own LM head"):
        load_recipe({"model": {"name": str(tmp_path)}, "task": {"type": "causal-lm"}, "strategy": {"name": "linear-probe"}})
    assert load_recipe({"model": {"name": str(tmp_path)}, "task": {"type": "causal-lm"}}).train.metric_for_best == "loss"


@pytest.mark.parametrize("name", ["sft-tiny-lora.yaml", "sft-tiny-full.yaml"])
def test_shipped_sft_recipes_run(name, tmp_path, monkeypatch):
    from pathlib import Path

    from tuneforge.llm.tiny import make_tiny_lm

    monkeypatch.chdir(tmp_path)
    make_tiny_lm("tiny-lm")
    recipe = Path(__file__).parents[2] / "recipes" / name
    run = finetune(str(recipe), overrides=["train.max_steps=4", "train.progress=false", "output.dir=run",
                                           "task.generation.eval_prompts=2"])
    assert (run.path / "model" / "tuneforge.json").exists() and run.metrics["generation"]["prompts"] == 2


def test_gradient_checkpointing_gives_the_same_gradients(lm_dir):
    from tuneforge.models import load_model
    from tuneforge.speed.model import enable_checkpointing as _checkpointing
    from tuneforge.tasks.causal_lm import CausalLM

    grads = []
    for checkpointing in (False, True):
        loaded = load_model(str(lm_dir), causal_lm=True)
        model = CausalLM(loaded.backbone, loaded.lm_head).train()
        if checkpointing:
            _checkpointing(model, lambda message: None)
            assert loaded.backbone.is_gradient_checkpointing
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
        torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout; checkpointing replays its RNG state)
        loss, n = model(input_ids=ids, labels=ids)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_generate_and_chat_commands(lm_dirs, tmp_path, monkeypatch, capsys):
    import io

    from tuneforge.cli import main
    from tuneforge.deploy.generator import Generator

    recipe = _recipe(lm_dirs("llama"), tmp_path, "full", format="chat")
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in reverse_task(24, 4)]
    write_jsonl(tmp_path / "train.jsonl", chats)
    recipe["data"]["train"] = recipe["data"]["validation"] = str(tmp_path / "train.jsonl")
    recipe["train"]["max_steps"] = 2
    run = finetune(recipe)
    assert json.loads((run.path / "manifest.json").read_text())["task_settings"]["chat_template"] == "chatml"
    expected = Generator(run.path).complete(["reverse abc ="], max_new_tokens=5)[0]
    capsys.readouterr()
    assert main(["generate", str(run.path), "--prompt", "reverse abc =", "--json", "--max-new-tokens", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"prompt": "reverse abc =", "reply": expected}
    monkeypatch.setattr("sys.stdin", io.StringIO("reverse abc =\n/reset\nreverse abc =\n\n"))
    assert main(["chat", str(run.path), "--max-new-tokens", "5"]) == 0
    # /reset starts over, so the same first message gets the same reply twice
    assert capsys.readouterr().out.count(f"model> {expected}") == 2
    assert main(["generate", str(run.path)]) != 0
    assert "nothing to generate from: give --prompt" in capsys.readouterr().err


def test_lora_run_exports_as_a_merged_hf_causal_lm(lm_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.export import export_run
    from tuneforge.deploy.generator import Generator

    recipe = _recipe(lm_dirs("llama"), tmp_path, "lora")
    recipe["train"]["max_steps"] = 3
    recipe["task"]["generation"]["eval_prompts"] = 0
    run = finetune(recipe)
    report = export_run(run.path, "hf", tmp_path / "exported", log=lambda m: None)
    assert report["merged"] and report["max_abs_diff"] < 1e-3
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")  # no peft needed
    assert not any("lora" in n for n, _ in plain.named_parameters())
    core = Generator(run.path).model
    ids = torch.tensor([[3, 9, 12, 7]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, core(input_ids=ids), atol=1e-4)
    with pytest.raises(TuneforgeError, match="--format hf"):
        export_run(run.path, "onnx", tmp_path / "x")


def test_the_docs_cli_export_of_a_causal_lm_prints_its_parity_report(lm_dirs, tmp_path, capsys):
    # `tuneforge export runs/sft-tiny-lora-* --format hf --out merged2` wrote the model, then died with
    # KeyError: 'label_agreement' printing a report the causal-LM exporter did not fill
    from tuneforge.cli import main

    recipe = _recipe(lm_dirs("llama"), tmp_path, "lora")
    recipe["train"]["max_steps"] = 1
    recipe["task"]["generation"]["eval_prompts"] = 0
    run = finetune(recipe)
    capsys.readouterr()
    assert main(["export", str(run.path), "--format", "hf", "--out", str(tmp_path / "merged2")]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["format"] == "hf" and printed["check"] == "passed" and printed["label_agreement"] == 1.0
    assert printed["max_abs_diff"] < 1e-3
    saved = json.loads((tmp_path / "merged2" / "export.json").read_text())
    assert saved["label_agreement"] == 1.0 and saved["check"] == "passed"


def test_qlora_needs_lora_and_says_what_it_needs_on_cpu(lm_dirs, tmp_path):
    from tuneforge.recipe import load_recipe

    recipe = _recipe(lm_dirs("llama"), tmp_path, "full")
    recipe["model"]["load_in_4bit"] = True
    with pytest.raises(TuneforgeError, match="strategy.name: lora"):
        load_recipe(recipe)
    recipe["strategy"]["name"] = "lora"
    if not torch.cuda.is_available():
        with pytest.raises(TuneforgeError, match="needs a CUDA GPU"):
            finetune(recipe)
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_predict_on_a_causal_lm_run_points_at_generate(lm_dirs, tmp_path):
    from tuneforge.deploy.evaluate import evaluate_run
    from tuneforge.deploy.predictor import Predictor

    recipe = _recipe(lm_dirs("gpt2"), tmp_path, "bitfit")
    recipe["train"]["max_steps"] = 2
    recipe["task"]["generation"]["eval_prompts"] = 0
    run = finetune(recipe)
    with pytest.raises(TuneforgeError, match="tuneforge generate"):
        Predictor(run.path)
    again = evaluate_run(run.path, recipe["data"]["validation"])  # the saved model scores the same loss
    assert again["loss"] == pytest.approx(run.metrics["validation"]["loss"], rel=1e-3)
