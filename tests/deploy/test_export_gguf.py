"""`tuneforge export RUN --format gguf`: a tiny Llama (LoRA, merged) and a tiny Qwen2 (full) written,
read back by transformers and by llama.cpp itself, and the checks shown to fail on a layout bug."""

import json
from pathlib import Path

import pytest
import torch

from tuneforge import finetune
from tuneforge.deploy.export import export_run
from tuneforge.deploy.export import gguf as gguf_export
from tuneforge.errors import TuneforgeError
from tuneforge.llm.templates import Template
from tuneforge.llm.tiny import make_tiny_lm

from gguf_kit import LlamaCpp, chat_data, make_tiny_qwen2


def _recipe(model, train, val, out, strategy, **task):
    return {"model": {"name": str(model)},
            "task": {"type": "causal-lm", "max_length": 64, "generation": {"eval_prompts": 0}, **task},
            "data": {"train": str(train), "validation": str(val)}, "strategy": {"name": strategy},
            "train": {"max_steps": 2, "batch_size": 8, "lr": 2e-2, "precision": "fp32", "progress": False},
            "output": {"dir": str(out), "report": False}}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama (GQA, untied head), LoRA-trained two steps on prompt/completion data."""
    tmp = tmp_path_factory.mktemp("gguf-llama")
    lm = make_tiny_lm(tmp / "tiny")
    return finetune(_recipe(lm, lm / "sft-train.jsonl", lm / "sft-val.jsonl", tmp / "run", "lora")).path


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, tied embeddings, padded vocabulary, its own Jinja template),
    fully fine-tuned two steps on chat data."""
    tmp = tmp_path_factory.mktemp("gguf-qwen")
    model = make_tiny_qwen2(tmp / "qwen")
    train, val = chat_data(tmp)
    return finetune(_recipe(model, train, val, tmp / "run", "full")).path


def test_a_preference_run_exports_with_its_pairs_as_held_out_text(tmp_path):
    """DPO (LoRA) on the tiny Llama: the check reads the run's validation pairs (prompt + chosen)."""
    lm = make_tiny_lm(tmp_path / "tiny")
    recipe = _recipe(lm, lm / "dpo-train.jsonl", lm / "dpo-val.jsonl", tmp_path / "run", "lora")
    recipe["task"] = {"type": "preference", "max_length": 64, "generation": {"eval_prompts": 0}}
    run = finetune(recipe).path
    report = export_run(run, "gguf", tmp_path / "out", gguf_dtype="f32", samples=4)
    assert report["check"] == "passed" and report["samples"].startswith("4 rows of") and report["merged"]
    assert report["max_abs_diff"] <= 1e-4 and report["texts"] == 4


def _run_model(run):
    from tuneforge.llm.model import core_model
    from tuneforge.run.artifact import load_model_dir
    from tuneforge.strategies.base import merged_module

    model, task, _, _ = load_model_dir(Path(run))
    return core_model(merged_module(model)).lm.eval(), task


@pytest.mark.parametrize("which", ["llama_run", "qwen_run"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_reloads_with_logit_parity_equal_tokens_and_the_chat_template(which, dtype, request, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = request.getfixturevalue(which)
    report = export_run(run, "gguf", tmp_path / "out", gguf_dtype=dtype)
    path = tmp_path / "out" / f"model-{dtype}.gguf"
    assert report["check"] == "passed" and report["tokens_equal"] and path.is_file()
    assert json.loads((tmp_path / "out" / "export.json").read_text())["file"] == path.name
    assert report["samples"].startswith("8 rows" if which == "qwen_run" else "16 rows")  # held-out rows, not fixed
    assert report["merged"] is (which == "llama_run")
    assert report["layout"]["max_abs_diff"] <= 1e-4 and report["layout"]["top1_agreement"] == 1.0
    assert report["max_abs_diff"] <= (1e-4 if dtype == "f32" else 0.05)
    # and independently of the exporter's own check: the file, read by plain transformers
    lm, task = _run_model(run)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    conv = [{"role": "user", "content": "reverse bad ="}, {"role": "assistant", "content": " dab"}]
    text = task.template.render(conv).text
    ids = task.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.inference_mode():
        want, got = lm(input_ids=torch.tensor([ids])).logits, loaded(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(want, got, atol=1e-4 if dtype == "f32" else 2e-2), float((want - got).abs().max())
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True) == task.template.prompt(conv[:1])
    assert tok.eos_token == task.tokenizer.eos_token and loaded.config.eos_token_id == task.tokenizer.eos_token_id


def test_gguf_metadata_reads_back_with_llamacpps_reader(llama_run, qwen_run, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader, TokenType

    def fields(path):
        reader = GGUFReader(path)
        return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    export_run(llama_run, "gguf", tmp_path / "llama", gguf_dtype="f16")
    reader, kv = fields(tmp_path / "llama" / "model-f16.gguf")
    lm, task = _run_model(llama_run)
    c = lm.config
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 1
    assert (kv["llama.block_count"], kv["llama.context_length"], kv["llama.embedding_length"],
            kv["llama.feed_forward_length"], kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"],
            kv["llama.vocab_size"], kv["llama.rope.dimension_count"]) == (
        c.num_hidden_layers, c.max_position_embeddings, c.hidden_size, c.intermediate_size, c.num_attention_heads,
        c.num_key_value_heads, c.vocab_size, c.hidden_size // c.num_attention_heads)
    assert kv["llama.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"][:5] == ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    assert kv["tokenizer.ggml.token_type"][:5] == [TokenType.CONTROL] * 5
    merges = json.loads(task.tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert kv["tokenizer.ggml.token_type"][5] == TokenType.NORMAL
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (0, 1, 2)
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == gguf_export.chat_template(task.template)
    tensors = {t.name: t for t in reader.tensors}
    per_block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(c.num_hidden_layers) for n in per_block}
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32  # 1-D stays f32
    assert list(tensors["blk.0.attn_k.weight"].shape) == [c.hidden_size, c.num_key_value_heads * 16]  # GGUF: (in, out)

    export_run(qwen_run, "gguf", tmp_path / "qwen", gguf_dtype="f32")
    reader, kv = fields(tmp_path / "qwen" / "model-f32.gguf")
    names = {t.name for t in reader.tensors}
    assert kv["general.architecture"] == "qwen2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
    assert len(kv["tokenizer.ggml.tokens"]) == kv["qwen2.vocab_size"] == 320  # padded rows
    assert kv["tokenizer.ggml.token_type"][-1] == TokenType.UNUSED and "tokenizer.ggml.bos_token_id" not in kv
    assert kv["tokenizer.chat_template"].startswith("{% for message in messages %}")  # the tokenizer's own


def test_a_wrong_rotary_permutation_fails_the_check_and_writes_nothing(llama_run, tmp_path, monkeypatch):
    """The classic bug: q/k written in HF's layout. transformers' loader then 'un-permutes' rows
    that were never permuted — gibberish in llama.cpp; here the export refuses."""
    monkeypatch.setattr(gguf_export, "permute", lambda weight, n_head: weight)
    with pytest.raises(TuneforgeError, match="tensor layout bug"):
        export_run(llama_run, "gguf", tmp_path / "out", gguf_dtype="f32")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".export-*"))


def test_a_template_that_renders_differently_fails_the_check(llama_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "chat_template", lambda template: "{{ messages[0]['content'] }}")
    with pytest.raises(TuneforgeError, match="chat template renders"):
        export_run(llama_run, "gguf", tmp_path / "out", gguf_dtype="f32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["chatml", "llama", "none"])
def test_builtin_templates_as_jinja_render_what_tuneforge_renders(llama_run, name):
    _, task = _run_model(llama_run)
    template = Template(name, task.tokenizer)
    jinja = gguf_export.chat_template(template)
    for conv in gguf_export.FIXED + [[{"role": "user", "content": "hi"}]]:
        for upto in range(1, len(conv) + 1):
            part = conv[:upto]
            want = template.render(part).text if part[-1]["role"] == "assistant" else template.prompt(part)
            got = task.tokenizer.apply_chat_template(part, chat_template=jinja, tokenize=False,
                                                     add_generation_prompt=part[-1]["role"] != "assistant")
            assert got == want, (name, part)


def test_llamacpp_itself_reads_the_file_the_same_way(llama_run, qwen_run, tmp_path):
    """llama.cpp (not transformers) on the exported files: its tokenizer gives the run's ids, its
    template engine renders the run's prompt, and its greedy tokens and log-probs are the run's."""
    for name, run in (("llama", llama_run), ("qwen", qwen_run)):
        export_run(run, "gguf", tmp_path / name, gguf_dtype="f32")
        lm, task = _run_model(run)
        server = LlamaCpp(tmp_path / name / "model-f32.gguf")
        conv = [{"role": "user", "content": "reverse cab ="}]
        prompt = task.template.prompt(conv)
        assert server.apply_template(conv) == prompt, name
        ids = task.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert server.tokenize(prompt) == ids, name
        for text in ("reverse abcd = dcba", "  spaces\n\nand 12 345 digits!"):
            assert server.tokenize(text) == task.tokenizer(text, add_special_tokens=False)["input_ids"], (name, text)
        steps = server.greedy(ids, 6)
        assert steps
        with torch.inference_mode():
            for token, logprob in steps:
                want = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                assert token == int(want.argmax()), name
                assert abs(logprob - float(want[token])) < 2e-3, (name, logprob, float(want[token]))
                ids = ids + [token]
        del server


@pytest.mark.parametrize("name", ["chatml", "llama", "none"])
def test_llamacpps_template_engine_renders_the_builtin_templates(llama_run, tmp_path, name):
    """The Jinja written for the built-in templates, rendered by llama.cpp's own engine (not Jinja2)."""
    lm, task = _run_model(llama_run)
    template = Template(name, task.tokenizer)
    gguf_export.write_gguf(tmp_path / "m.gguf", lm, task.tokenizer, template, "f32",
                           {"task": {"type": "causal-lm"}, "strategy": "lora"})
    server = LlamaCpp(tmp_path / "m.gguf")
    for conv in gguf_export.FIXED:
        prompt = conv[:-1]
        assert server.apply_template(prompt) == template.prompt(prompt), (name, prompt)
    del server


# -- refusals: before any model loads --------------------------------------------------------------
def _fake_run(tmp_path, **meta) -> Path:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    base = {"task": {"type": "causal-lm"}, "family": "llama", "strategy": "lora", "base_model": {"name": "x"}}
    (run / "model" / "tuneforge.json").write_text(json.dumps({**base, **meta}))
    return run  # no weights at all: a refusal that needed the model would fail differently


@pytest.mark.parametrize("meta,match", [
    ({"task": {"type": "text-classification"}, "family": "bert"}, "not generative"),
    ({"family": "gpt2"}, r"Llama-family and Qwen2-family decoders \(llama, qwen2\); this run's model is 'gpt2'"),
    ({"strategy": "prompt-tuning"}, "outside the base architecture"),
    ({"base_model": {"name": "x", "load_in_4bit": True}}, "4-bit base"),
])
def test_unsupported_runs_are_refused_before_loading(tmp_path, meta, match):
    with pytest.raises(TuneforgeError, match=match):
        export_run(_fake_run(tmp_path, **meta), "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_gguf_options_name_the_fix(tmp_path):
    run = _fake_run(tmp_path)
    with pytest.raises(TuneforgeError, match="use it with --format gguf"):
        export_run(run, "onnx", tmp_path / "out", gguf_dtype="f16")
    with pytest.raises(TuneforgeError, match="choose one of f16, f32"):
        export_run(run, "gguf", tmp_path / "out", gguf_dtype="q4")


def test_unknown_pre_tokenizers_and_architectures_are_refused():
    with pytest.raises(TuneforgeError, match="no llama.cpp pre-tokenizer name.*known: GPT-2"):
        gguf_export._pre_tokenizer({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    assert gguf_export._pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}) == "smollm"
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                            "original_max_position_embeddings": 256,
                                                                            "low_freq_factor": 1, "high_freq_factor": 4})
    with pytest.raises(TuneforgeError, match="rope scaling llama3"):
        gguf_export._check_architecture(config)


def test_export_gguf_cli(llama_run, tmp_path, capsys):
    from tuneforge.cli import main

    assert main(["export", str(llama_run), "--format", "gguf", "--gguf-dtype", "f32", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert '"format": "gguf"' in printed and '"check": "passed"' in printed
    assert (tmp_path / "o" / "model-f32.gguf").is_file()


# -- real weights (slow): SmolLM2-135M-Instruct, a few LoRA steps, exported to f32 and f16 -----------
SMOLLM2 = "smollm2-135m"  # the built-in alias (make install installs it)
ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "instruct" / "alpaca_en_demo.json"


@pytest.mark.slow
def test_smollm2_lora_run_exports_to_gguf_with_parity(tmp_path):
    import time

    if not ALPACA.is_file():
        pytest.fail(f"needs {ALPACA} (the shared data beside the checkout)")
    rows = json.loads(ALPACA.read_text())
    (tmp_path / "train.json").write_text(json.dumps(rows[:16]))
    (tmp_path / "val.json").write_text(json.dumps(rows[-8:]))
    recipe = _recipe(SMOLLM2, tmp_path / "train.json", tmp_path / "val.json", tmp_path / "run", "lora",
                     chat_template="tokenizer", max_length=128)
    recipe["train"].update(max_steps=3, batch_size=4, lr=1e-3)
    run = finetune(recipe).path
    lm, task = _run_model(run)
    for dtype in ("f32", "f16"):
        t0 = time.perf_counter()
        report = export_run(run, "gguf", tmp_path / dtype, gguf_dtype=dtype)
        seconds = time.perf_counter() - t0
        path = tmp_path / dtype / f"model-{dtype}.gguf"
        assert report["check"] == "passed" and report["tokens_equal"] and report["merged"]
        assert report["tied_embeddings"] and report["pre_tokenizer"] == "gpt-2" and report["samples"].startswith("8 rows")
        print(f"FIGURE smollm2 {dtype}: {path.stat().st_size:,} bytes, max|dlogit| vs run {report['max_abs_diff']:.3g} "
              f"(scale {report['logit_scale']:.1f}), top-1 {report['label_agreement']:.2%} of {report['positions']}, "
              f"layout {report['layout']['max_abs_diff']:.3g}, {seconds:.1f} s export")
        # llama.cpp itself: the tokenizer's own template, its ids, and its greedy reply
        server = LlamaCpp(path, n_ctx=512)
        conv = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = task.template.prompt(conv)
        assert server.apply_template(conv) == prompt
        ids = task.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert server.tokenize(prompt) == ids
        steps = server.greedy(ids, 8)
        want, context = [], list(ids)
        with torch.inference_mode():
            for _ in steps:
                want.append(int(lm(input_ids=torch.tensor([context])).logits[0, -1].argmax()))
                context.append(want[-1])
        same = sum(a == b for a, (b, _) in zip(want, steps))
        print(f"FIGURE smollm2 {dtype} llama.cpp greedy: {same}/{len(steps)} tokens equal: "
              f"{task.tokenizer.decode([t for t, _ in steps])!r}")
        if dtype == "f32":
            assert same == len(steps) >= 3
        del server
