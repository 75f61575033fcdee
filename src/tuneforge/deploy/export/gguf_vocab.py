"""The tokenizer and chat template of a GGUF file (``tokenizer.ggml.*``, ``tokenizer.chat_template``),
from the run's own tokenizer and template; ``gguf.py`` writes them with the weights."""

from __future__ import annotations

import json
import tempfile

from ...errors import TuneforgeError

# llama.cpp's pre-tokenizer names for the byte-level pre-tokenizers transformers writes. The split
# regexes are the models' own (Llama 3's tokenizer.json; Qwen2's is transformers' PRETOKENIZE_REGEX).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = "GPT-2 byte-level (gpt-2), SmolLM digits + byte-level (smollm), Llama 3 (llama-bpe), Qwen2 (qwen2)"


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the run tokenizer's pre-tokenizer; refuses one it has no name for
    (a wrong name splits text differently in llama.cpp: the quiet kind of broken)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) \
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            pattern = steps[0].get("pattern", {}).get("Regex")
            if pattern == QWEN2_SPLIT:
                return "qwen2"
            if pattern == _LLAMA3_SPLIT:
                return "llama-bpe"
    raise TuneforgeError(f"--format gguf: the run's tokenizer splits text with {json.dumps(pre)[:300]}, which has no "
                         f"llama.cpp pre-tokenizer name here (known: {PRE_TOKENIZERS}); llama.cpp would tokenise "
                         "differently from training — export with --format hf and convert with llama.cpp's own "
                         "convert_hf_to_gguf.py")


def vocab(tokenizer, n_vocab: int) -> dict:
    """Everything llama.cpp's ``tokenizer.ggml.*`` keys hold, from the run's (fast) tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TuneforgeError("--format gguf writes byte-level BPE vocabularies (GPT-2 style: SmolLM, Llama 3, Qwen2); "
                             f"this tokenizer is {model.get('type')} with a {(spec.get('decoder') or {}).get('type')} "
                             "decoder (SentencePiece, as in Llama 2 / Mistral, is not written yet) — export with "
                             "--format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    if (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
        raise TuneforgeError(f"--format gguf: the tokenizer normalises text ({spec['normalizer']['type']}), which "
                             "llama.cpp's BPE does not do; export with --format hf")
    pre = _pre_tokenizer(spec)
    if len(tokenizer) > n_vocab:
        raise TuneforgeError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    backend = tokenizer.backend_tokenizer
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        text = backend.id_to_token(i)
        if text is None:  # embedding rows past the vocabulary (padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL if text not in added else
                         gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED)
    with tempfile.TemporaryDirectory() as tmp:
        # llama.cpp's own reader of tokenizer.json merges (both the "a b" and the ["a", "b"] layouts)
        tokenizer.save_pretrained(tmp)
        merges = gguf.SpecialVocab(tmp, load_merges=True).merges
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "ids": ids,
            "add_bos": len(full) > len(plain) and full[0] == ids["bos"],
            "add_eos": len(full) > len(plain) and full[-1] == ids["eos"]}


def _lit(text: str) -> str:
    """A Jinja string literal. Real newlines, not escapes: both Jinja2 and llama.cpp's template
    engine read them the same way."""
    if "'" not in text and "\\" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise TuneforgeError(f"cannot write the special token {text!r} into a Jinja chat template")


def chat_template(template) -> str:
    """The run's template as Jinja. A tokenizer template is the tokenizer's own text; the built-in
    ones are written out to render exactly what ``llm.templates.Template`` renders (the export
    checks that they do, on every conversation it compares)."""
    if template.name == "tokenizer":
        jinja = template.tok.chat_template
        if not isinstance(jinja, str):
            raise TuneforgeError("the tokenizer has several named chat templates; GGUF holds one")
        return jinja
    bos, eos = template.bos, template.eos
    head = "{{ " + _lit(bos) + " }}" if bos else ""
    if template.name == "chatml":
        end = "<|im_end|>" + ("" if eos == "<|im_end|>" else eos)
        return (head + "{% for message in messages %}{% if message['role'] == 'assistant' %}"
                "{{ '<|im_start|>assistant\n' + message['content'] + " + _lit(end) + " + '\n' }}"
                "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    if template.name == "llama":
        again = "{% if loop.index0 > 1 %}{{ " + _lit(bos) + " }}{% endif %}" if bos else ""
        return (head + "{% set ns = namespace(system=none) %}{% for message in messages %}"
                "{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}"
                "{% elif message['role'] == 'user' %}" + again + "{{ '[INST] ' }}"
                "{% if ns.system is not none %}{{ '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' }}"
                "{% set ns.system = none %}{% endif %}{{ message['content'] + ' [/INST] ' }}"
                "{% else %}{{ message['content'] + " + _lit(eos) + " }}{% endif %}{% endfor %}")
    return (head + "{% for message in messages %}{% if message['role'] == 'assistant' %}"  # none: concatenation
            "{{ message['content'] + " + _lit(eos) + " }}{% else %}{{ message['content'] }}{% endif %}{% endfor %}")
