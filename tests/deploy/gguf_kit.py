"""Tiny Llama / Qwen2 runs for the GGUF export tests, and llama.cpp itself (xllamacpp) as a check."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from tuneforge.llm.tiny import corpus_text, reverse_task, write_jsonl

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's own template, cut down (no tools): a default system turn when there is none
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_qwen2(directory: Path, tied: bool = True, seed: int = 0) -> Path:
    """A random-init Qwen2 (q/k/v biases, GQA, tied embeddings) with a Qwen2-style byte-level BPE
    tokenizer (its split regex, no BOS, EOS <|im_end|>) and its own Jinja chat template."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_text() + ["You are a helpful assistant. 12 345"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIAL,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_TEMPLATE
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(fast) + 20,  # padded embedding rows past the vocabulary, as Qwen2.5's are
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=1e6, rms_norm_eps=1e-6,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None))
    with torch.no_grad():  # random biases: a layout bug in them shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def chat_data(directory: Path) -> tuple[Path, Path]:
    def rows(n, seed):
        return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                for r in reverse_task(n, seed)]
    return write_jsonl(directory / "chat-train.jsonl", rows(48, 1)), write_jsonl(directory / "chat-val.jsonl", rows(8, 2))


class LlamaCpp:
    """llama.cpp's own server (xllamacpp: prebuilt llama.cpp, no compiler) on a GGUF file; its
    HTTP endpoints listen on the loopback address only."""

    def __init__(self, path: Path, n_ctx: int = 256):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx, params.n_parallel, params.warmup, params.use_jinja = n_ctx, 1, False, True
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
        self.server = xllamacpp.Server(params)
        self.address = self.server.listening_address

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]

    def apply_template(self, messages: list[dict]) -> str:
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def greedy(self, ids: list[int], n: int) -> list[tuple[int, float]]:
        """(token id, log-prob) of up to ``n`` greedy steps after ``ids``; the last is the end-of-turn
        token when the model stops (llama.cpp's ``ignore_eos`` would forbid it, not ignore it)."""
        out = self.server.handle_completions({"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1,
                                              "n_probs": 1, "cache_prompt": False})
        return [(t["id"], t["logprob"]) for t in out["choices"][0]["logprobs"]["content"]]
