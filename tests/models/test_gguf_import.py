"""Any local GGUF as model.name: header checks, the conversion on a tiny GGUF written in the test,
and the run that must reload after the cache was cleared."""

from __future__ import annotations

import shutil

import pytest
import torch

from tinygguf import CHAT_TEMPLATE, write_tiny_gguf
from tuneforge.errors import TuneforgeError
from tuneforge.models import from_spec, load_model
from tuneforge.models.gguf_cache import models_dir
from tuneforge.models.gguf_import import PROBE_TEXT, check_readable, read_header


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tied -> (hf_dir, gguf_path) of the same random Llama."""
    root = tmp_path_factory.mktemp("tinygguf")
    return {tied: write_tiny_gguf(root / ("tied" if tied else "untied"), tied=tied) for tied in (False, True)}


def _logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits


def test_the_header_reader_sees_what_the_file_holds(tiny):
    _, path = tiny[False]
    header = read_header(path)
    assert header.version == 3 and header.architecture == "llama" and header.tokenizer_model == "gpt2"
    assert header.chat_template == CHAT_TEMPLATE
    assert "output.weight" in header.tensors and "output.weight" not in read_header(tiny[True][1]).tensors
    assert header.type_names() == f"F32 ×{len(header.tensors)}"
    check_readable(header)  # a readable file passes


@pytest.mark.parametrize("tied", [False, True])
def test_a_gguf_converts_to_the_same_model_and_tokenizer(tiny, tied, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, path = tiny[tied]
    loaded = load_model(str(path), causal_lm=True)
    assert loaded.info.family == "llama" and loaded.info.spec["gguf_source"] == str(path.resolve())
    assert loaded.info.source.startswith(f"GGUF {path.resolve()}")
    entry = next(p for p in models_dir().iterdir() if p.name.startswith("tiny-"))
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok(PROBE_TEXT)["input_ids"]])
    assert loaded.tokenizer(PROBE_TEXT)["input_ids"] == ids[0].tolist()
    assert torch.equal(_logits(loaded.lm.eval(), ids), _logits(original, ids))
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.lm.config.tie_word_embeddings is tied
    shares = loaded.lm.get_output_embeddings().weight.data_ptr() == loaded.lm.get_input_embeddings().weight.data_ptr()
    assert shares is tied
    assert (entry / "probe.safetensors").is_file() and loaded.info.spec["config_dir"] == str(entry.resolve())
    # the source name "auto" resolves to, and a second load that reads the copy
    from tuneforge.models.loader import _resolve_source

    assert _resolve_source(str(path)) == "gguf"
    assert load_model(str(path), source="gguf").info.spec["config_dir"] == str(entry.resolve())


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(TuneforgeError, match=r"model.gguf is not a GGUF file \(it starts with b'PK"):
        load_model(str(fake))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x80\x02 a pickle")
    with pytest.raises(TuneforgeError, match="is a file but not a GGUF one.*model.weights"):
        load_model(str(other))
    with pytest.raises(TuneforgeError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"), source="gguf")


def test_a_truncated_gguf(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[False][1].read_bytes()[:200])
    with pytest.raises(TuneforgeError, match="truncated or damaged"):
        load_model(str(cut))


def test_an_architecture_transformers_cannot_read(tmp_path):
    _, path = write_tiny_gguf(tmp_path, arch="rwkv7")
    with pytest.raises(TuneforgeError, match=r"holds a 'rwkv7' model, which transformers cannot read.*llama.*qwen2"):
        load_model(str(path))
    assert not models_dir().exists() or not any(models_dir().iterdir())  # refused before anything was written


def test_a_gguf_without_a_tokenizer(tmp_path):
    _, path = write_tiny_gguf(tmp_path, tokenizer=False)
    with pytest.raises(TuneforgeError, match="carries no tokenizer.*tokenizer.ggml"):
        load_model(str(path))


def test_a_damaged_copy_is_refused_when_the_model_loads(tiny):
    path = tiny[True][1]
    load_model(str(path), causal_lm=True)
    entry = next(p for p in models_dir().iterdir() if p.name.startswith("tiny-"))
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(TuneforgeError, match="damaged: the sha256 of model.safetensors.*rm -rf"):
        load_model(str(path), causal_lm=True)


def test_from_spec_reconverts_when_the_cache_was_cleared(tiny):
    loaded = load_model(str(tiny[False][1]), causal_lm=True)
    shutil.rmtree(models_dir())
    rebuilt = from_spec(loaded.info.spec)
    assert rebuilt.info.family == "llama" and models_dir().is_dir()


@pytest.mark.parametrize("via", ["file", "alias"])
def test_a_lora_run_on_a_gguf_reloads_after_the_cache_was_cleared(tiny, tmp_path, via, monkeypatch):
    """The run keeps a reference to its base (model.name); a machine without the converted copy
    converts it again when the run loads."""
    from tuneforge import finetune
    from tuneforge.deploy.generator import Generator
    from tuneforge.llm.tiny import reverse_task, write_jsonl
    from tuneforge.models import aliases
    from tuneforge.models.gguf_cache import GgufSource

    path = tiny[False][1]
    name = str(path)
    if via == "alias":
        name = "tiny-test-llm"
        alias = aliases.Alias("a tiny test LLM", "none", aliases._gguf_alias_loader(lambda: GgufSource(
            "alias 'tiny-test-llm'", (path,), "tiny-test-llm")), kind="causal-lm")
        monkeypatch.setitem(aliases.ALIASES, name, alias)
    train = write_jsonl(tmp_path / "train.jsonl", reverse_task(32, 1))
    run = finetune({"model": {"name": name},
                    "task": {"type": "causal-lm", "max_length": 48,
                             "generation": {"eval_prompts": 2, "max_new_tokens": 4, "sampled": False}},
                    "data": {"train": str(train), "validation": str(train)}, "strategy": {"name": "lora"},
                    "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-3, "progress": False, "precision": "fp32"},
                    "output": {"dir": str(tmp_path / "run"), "report": False}})
    prompts = ["reverse abc =", "reverse hgf ="]
    before = Generator(run.path).complete(prompts, raw=True, max_new_tokens=4)
    shutil.rmtree(models_dir())
    after = Generator(run.path).complete(prompts, raw=True, max_new_tokens=4)
    assert after == before and any(p.name.startswith(("tiny-", "tiny-test-llm-")) for p in models_dir().iterdir())
