"""``--format gguf``: one llama.cpp file (weights, architecture, tokenizer, chat template), checked.

What is written (with llama.cpp's own ``gguf.GGUFWriter`` and tensor-name table, the code its
``convert_hf_to_gguf.py`` uses):

- architecture ``llama`` or ``qwen2`` with context length, embedding length, block count,
  feed-forward length, head counts (KV heads for GQA), rope dimension and base, RMS epsilon and
  vocabulary size;
- the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q/k/v/output``,
  ``blk.N.ffn_gate/up/down``, ``attn_norm``, ``ffn_norm``, ``output_norm``, ``output`` unless the
  embeddings are tied), LoRA / IA3 merged; 2-D weights in f16 or f32, norms and biases in f32
  (llama.cpp's kernels read 1-D tensors as f32 only);
- the Llama q/k permutation. Hugging Face's Llama rotates the two *halves* of each head
  (``rotate_half``); llama.cpp's ``llama`` graph rotates *adjacent pairs*, so the rows of q_proj and
  k_proj are interleaved per head (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; k with the
  KV head count under GQA). transformers' GGUF loader undoes exactly this. Qwen2 runs llama.cpp's
  NeoX rope (halves, like HF), so its tensors are written as they are, biases included;
- the tokenizer (``gguf_vocab.py``): the byte-level BPE ("gpt2" model) vocabulary padded to the embedding rows,
  token types (special added tokens CONTROL, other added tokens USER_DEFINED, padding UNUSED),
  merges, BOS/EOS/UNK/PAD ids, whether a BOS/EOS is added, and the pre-tokenizer's llama.cpp name,
  read from the run's tokenizer structure (not guessed from a hash of known models);
- the run's chat template as Jinja (``tokenizer.chat_template``): the tokenizer's own, or the
  built-in ``chatml`` / ``llama`` / ``none`` template written out as Jinja that renders the same text.

Checked before the file is called done (it is written into a temporary folder and moved into
``--out`` only when every check passes): the file is read back with transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``gguf_file=``), and on held-out texts from the
run's validation data (a few fixed conversations when the data is gone) the next-token logits at
every position are compared with the run's model, the token ids must be equal, and the chat
template must render every conversation exactly as the run's does.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ...errors import TuneforgeError
from .common import TOLERANCE, publish
from .gguf_vocab import _pre_tokenizer, chat_template, vocab as _vocab  # noqa: F401 - _pre_tokenizer: for the tests

DTYPES = ("f16", "f32")
SUPPORTED = ("llama", "qwen2")  # HF model_type == llama.cpp architecture name
# f16: the file is compared twice. With the run's weights rounded to f16 exactly as written, the
# logits must agree as tightly as an f32 file (TOLERANCE): that is the layout check. Against the
# run's own fp32 model the rounding shows; this rule bounds it (SmolLM2-135M: docs/export-gguf.md).
F16_DRIFT = 0.05  # max |logit diff| <= F16_DRIFT x max(1, |logit|)
F16_MIN_TOP1 = 0.9  # share of positions whose top-1 next token is unchanged
MAX_TOKENS = 128  # tokens of each held-out text that are compared
FIXED = [  # used for the template check always, and for everything when the run's data is gone
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And another 1, 22 or 333?"},
     {"role": "assistant", "content": "Red."}],
]
def refuse_early(meta: dict) -> None:
    """Everything decidable from the saved run alone, before its model loads."""
    from ...strategies import strategy_class
    from ...tasks import task_class

    try:
        import gguf  # noqa: F401 - llama.cpp's writer; transformers reads the file back with it too
    except ImportError:
        raise TuneforgeError("--format gguf needs the gguf package: pip install 'tuneforge[gguf]'") from None
    task = task_class(meta["task"]["type"])
    if not task.generative:
        raise TuneforgeError(f"--format gguf writes a causal language model for llama.cpp; this is a "
                             f"{meta['task']['type']} run (not generative) — export it with --format onnx, "
                             "safetensors or hf")
    family = meta.get("family")
    if family not in SUPPORTED:
        raise TuneforgeError(f"--format gguf supports Llama-family and Qwen2-family decoders ({', '.join(SUPPORTED)}); "
                             f"this run's model is '{family}' — export it with --format hf and convert it with "
                             "llama.cpp's convert_hf_to_gguf.py, if llama.cpp supports it")
    strategy = strategy_class(meta["strategy"])
    if not strategy.plain_export:
        raise TuneforgeError(f"strategy {meta['strategy']} keeps modules or virtual tokens outside the base "
                             "architecture, which a GGUF file cannot hold; train with lora, ia3, bitfit or full")
    if meta.get("base_model", {}).get("load_in_4bit"):
        raise TuneforgeError("this run trained LoRA on a 4-bit base (model.load_in_4bit, QLoRA); --format gguf needs "
                             "full-precision weights to merge into — retrain without load_in_4bit, or export the "
                             "adapter with the run (model/adapter) and merge it on a full-precision base")


def _check_architecture(config) -> str:
    """The llama.cpp architecture of ``config``; refuses what the ``llama`` / ``qwen2`` graphs
    would compute differently from transformers."""
    arch = config.model_type
    if arch not in SUPPORTED:
        raise TuneforgeError(f"--format gguf supports {', '.join(SUPPORTED)} decoders; this model is '{arch}'")
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act} (llama.cpp's {arch} graph uses silu)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))} (only plain RoPE is written)")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        problems.append("attention/MLP biases (transformers' GGUF loader reads a Llama without them)")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if problems:
        raise TuneforgeError(f"--format gguf cannot write this {arch} model faithfully: {'; '.join(problems)}. "
                             "Export it with --format hf instead")
    return arch


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout (halves) -> llama.cpp's (adjacent pairs), per head: ``LlamaModel.permute``
    of convert_hf_to_gguf.py (``n_head`` is the KV head count for k_proj)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensors(lm, arch: str, dtype: str) -> tuple[list[tuple[str, np.ndarray]], bool]:
    """(GGUF name, array) for every weight, and whether the output projection is tied."""
    import gguf

    config = lm.config
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layers)
    tied = lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    out = []
    for hf_name, tensor in lm.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no `output` tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TuneforgeError(f"--format gguf: tensor {hf_name} has no llama.cpp name in the {arch} layout; "
                                 f"this model is not a plain {arch} decoder — export it with --format hf")
        t = tensor.detach().float().cpu()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = permute(t, n_head)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = permute(t, n_kv)
        array = t.numpy()
        if dtype == "f16" and array.ndim == 2:  # norms and biases stay f32 (convert_hf_to_gguf does the same)
            array = array.astype(np.float16)
        out.append((name, np.ascontiguousarray(array)))
    return out, tied


def _round_like_file(lm) -> None:
    """Round the weights that an f16 file holds in f16 (the 2-D ones), in place."""
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())


# -- writing ---------------------------------------------------------------------------------------
def write_gguf(path: Path, lm, tokenizer, template, dtype: str, meta: dict, name: str = "model") -> dict:
    """Write ``lm`` (a plain HF *ForCausalLM) with its tokenizer and chat template to ``path``."""
    import gguf

    config = lm.config
    arch = _check_architecture(config)
    tensors, tied = _tensors(lm, arch, dtype)
    n_vocab = lm.get_input_embeddings().weight.shape[0]
    vocab = _vocab(tokenizer, n_vocab)
    jinja = chat_template(template)
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    base = meta.get("base_model", {}).get("name")
    w.add_description(f"fine-tuned with tuneforge ({meta['task']['type']}, {meta['strategy']}) from {base}")
    if base:
        w.add_base_model_count(1)
        w.add_base_model_name(0, str(base))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["ids"].items():
        if token_id is not None:
            getattr(w, f"add_{kind}_token_id")(token_id)
    stops = [i for i in template.stop_ids() if i != vocab["ids"]["eos"]]
    if stops:  # ChatML's <|im_end|> when it is not the EOS: a turn ends there too
        w.add_eot_token_id(stops[0])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])
    w.add_chat_template(jinja)

    for name, array in tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "tied_embeddings": tied, "tensors": len(tensors), "pre_tokenizer": vocab["pre"],
            "vocab_size": n_vocab, "add_bos": vocab["add_bos"], "chat_template": jinja}


# -- checking --------------------------------------------------------------------------------------
def held_out(run_dir: Path, n: int) -> tuple[list[list[dict]], str]:
    """Up to ``n`` conversations from the run's own data (validation first), read with the run's
    recipe; the fixed ones when the data is gone."""
    from ...recipe import from_run_config
    from ...tasks import get_task

    config = run_dir / "config.yaml"
    if config.exists():
        recipe = from_run_config(config)
        reader = get_task(recipe)
        for split in ("validation", "test", "train"):
            path = getattr(recipe.data, split, None)
            if not path or not Path(path).exists():
                continue
            try:
                records = reader.read(split, path, limit=n, skipped=[])
            except TuneforgeError:
                continue
            convs = [c for c in map(_conversation, (r.values for r in records)) if c]
            if convs:
                return convs, f"{len(convs)} rows of {path}"
    return [list(c) for c in FIXED], f"{len(FIXED)} fixed conversations (the run's data is gone)"


def _conversation(values: dict) -> list[dict] | None:
    """A record's conversation: its messages (causal-lm), or the prompt and the chosen reply (preference)."""
    if isinstance(values.get("messages"), list):
        return values["messages"]
    if isinstance(values.get("prompt"), list) and isinstance(values.get("chosen"), list):
        return values["prompt"] + values["chosen"]
    return None


def _prompts(conversations: list[list[dict]]) -> list[list[dict]]:
    """The part of each conversation that asks for its last reply."""
    out = []
    for conv in conversations:
        if conv and conv[0]["role"] == "text":
            continue
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=len(conv))
        if conv[:last]:
            out.append(conv[:last])
    return out


def _logits(lm, ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [lm(input_ids=torch.tensor([x])).logits[0].float() for x in ids]  # each (T, V)


def _compare(reference: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    diff = max(float((g - r).abs().max()) for r, g in zip(reference, got))
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(reference, got))
    total = sum(r.shape[0] for r in reference)
    return {"max_abs_diff": diff, "logit_scale": scale, "top1_agreement": same / total, "positions": total}


def check(path: Path, task, dtype: str, conversations: list[list[dict]], reference, expected,
          ids: list[list[int]], jinja: str) -> dict:
    """Load ``path`` back with transformers and compare logits, token ids and the chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    got = _logits(loaded, ids)
    layout = _compare(expected, got)
    drift = _compare(reference, got) if dtype == "f16" else layout
    problems = []
    if not (layout["max_abs_diff"] <= TOLERANCE * layout["logit_scale"] and layout["top1_agreement"] == 1.0):
        problems.append(f"logits differ from the run's model{' with f16-rounded weights' if dtype == 'f16' else ''} "
                        f"by up to {layout['max_abs_diff']:.3g} (top-1 agrees on {layout['top1_agreement']:.1%}; "
                        f"rule |diff| <= {TOLERANCE:g} x max(1, |logit|) = {TOLERANCE * layout['logit_scale']:.3g}, "
                        "every top-1 equal) — a tensor layout bug (permutation, names, tying)")
    if dtype == "f16" and not (drift["max_abs_diff"] <= F16_DRIFT * drift["logit_scale"]
                               and drift["top1_agreement"] >= F16_MIN_TOP1):
        problems.append(f"f16 rounding moved the logits by up to {drift['max_abs_diff']:.3g} and kept the top-1 token "
                        f"on only {drift['top1_agreement']:.1%} of positions (rule: |diff| <= {F16_DRIFT:g} x "
                        f"max(1, |logit|), top-1 >= {F16_MIN_TOP1:.0%}) — export with --gguf-dtype f32")
    texts = [task.template.render(c).text for c in conversations]
    mismatched = [t[:60] for t in texts
                  if tok(t, add_special_tokens=False)["input_ids"] != task.tokenizer(t, add_special_tokens=False)["input_ids"]
                  or tok(t)["input_ids"] != task.tokenizer(t)["input_ids"]]
    if mismatched:
        problems.append(f"the file's tokenizer splits {len(mismatched)} of {len(texts)} texts differently, e.g. "
                        f"{mismatched[0]!r}")
    rendered, differ = 0, []
    for conv in _prompts(conversations) + _prompts(FIXED):
        try:
            want = task.template.prompt(conv)
        except Exception:  # noqa: BLE001 - a conversation the run's own template refuses (e.g. a system turn)
            continue
        rendered += 1
        if tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) != want:
            differ.append(want[:80])
    if tok.chat_template != jinja:
        problems.append("the file's chat template is not the one written")
    if differ:
        problems.append(f"the embedded chat template renders {len(differ)} of {rendered} conversations differently "
                        f"from the run's, e.g. {differ[0]!r}")
    eos = {"token": task.tokenizer.eos_token, "id": task.tokenizer.eos_token_id,
           "reloaded": [tok.eos_token, loaded.config.eos_token_id]}
    if eos["reloaded"] != [eos["token"], eos["id"]]:
        problems.append(f"EOS reads back as {eos['reloaded']}, the run's is {eos['token']!r} ({eos['id']})")
    return {"max_abs_diff": drift["max_abs_diff"], "logit_scale": drift["logit_scale"],
            "label_agreement": drift["top1_agreement"], "positions": drift["positions"],
            "layout": layout, "tokens_equal": not mismatched, "texts": len(texts),
            "chat_template_round_trip": f"{rendered - len(differ)} of {rendered} conversations equal",
            "eos": eos, "problems": problems}


def export(model, task, meta: dict, out: Path, log, *, dtype: str = "f16", samples: int = 16,
           run_dir: Path | None = None) -> dict:
    """Write ``<out>/model-<dtype>.gguf`` from a causal-LM run and check it (see the module doc)."""
    from ...llm.model import core_model
    from .common import plain_model

    if dtype not in DTYPES:
        raise TuneforgeError(f"--gguf-dtype {dtype}: choose one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    plain = plain_model(model, meta)
    lm = core_model(plain).lm.float().eval()
    _check_architecture(lm.config)
    source = run_dir if run_dir is not None and (run_dir / "config.yaml").exists() else \
        (run_dir.parent if run_dir is not None else Path("."))
    conversations, where = held_out(source, samples)
    ids = [task.tokenizer(task.template.render(c).text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
           for c in conversations]
    ids = [x for x in ids if x]
    reference = _logits(lm, ids)
    if dtype == "f16":
        _round_like_file(lm)
    expected = _logits(lm, ids) if dtype == "f16" else reference
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        path = tmp / f"model-{dtype}.gguf"
        t1 = time.perf_counter()
        written = write_gguf(path, lm, task.tokenizer, task.template, dtype, meta, name=source.name)
        t2 = time.perf_counter()
        result = check(path, task, dtype, conversations, reference, expected, ids, written.pop("chat_template"))
        problems = result.pop("problems")
        report = {"format": "gguf", "file": path.name, "bytes": path.stat().st_size, "dtype": dtype, **written,
                  "source": str(run_dir), "samples": where, "tokens_checked": sum(len(x) for x in ids), **result,
                  "rule": (f"logits: |diff| <= {TOLERANCE:g} x max(1, |logit|) and every top-1 equal"
                           + (" against the run's weights rounded to f16 as written; against the run's own weights "
                              f"|diff| <= {F16_DRIFT:g} x max(1, |logit|) and top-1 >= {F16_MIN_TOP1:.0%}"
                              if dtype == "f16" else "") + "; token ids equal; chat template renders equal"),
                  "check": "FAILED" if problems else "passed", "merged": plain is not model,
                  "chat_template_name": task.template_name}
        if problems:
            raise TuneforgeError("gguf parity check failed: " + "; ".join(problems) + "; nothing was written")
        report.update(seconds=round(time.perf_counter() - t0, 2), seconds_write=round(t2 - t1, 2),
                      seconds_check=round(time.perf_counter() - t2, 2))  # the rest: merge + the run's logits
        publish(tmp, out, report)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    mb = report["bytes"] / 2**20
    log(f"export gguf {dtype}: {out / report['file']} ({mb:,.1f} MiB, {report['architecture']}, "
        f"pre-tokenizer {report['pre_tokenizer']}) — parity on {where}, {report['positions']} positions: max |logit "
        f"diff| {report['max_abs_diff']:.3g} vs the run (top-1 agrees {report['label_agreement']:.1%})"
        + (f", {report['layout']['max_abs_diff']:.3g} vs its f16-rounded weights" if dtype == "f16" else "")
        + f"; token ids equal on {report['texts']} texts; chat template: {report['chat_template_round_trip']}")
    return report
