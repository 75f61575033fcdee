"""Tiny causal LMs and tokenizers built in the test (no pretrained LLM can be downloaded here)."""

from __future__ import annotations

import json
import random
import string

import torch

SPECIAL = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(directory, corpus: list[str], vocab_size: int = 300, chat_template: str | None = None):
    """A byte-level BPE tokenizer (decodes back to the exact text) trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def make_lm(directory, tokenizer, family: str = "llama", hidden: int = 64, layers: int = 2, positions: int = 256,
            seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=positions,
            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4,
                                           n_positions=positions, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory, safe_serialization=True)
    return model


LETTERS = "abcdefgh"


def reverse_task(n: int, seed: int) -> list[dict]:
    """'reverse abcd' -> 'dcba': a task a tiny model can learn in seconds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        out.append({"prompt": f"reverse {word} =", "completion": " " + word[::-1]})
    return out


def corpus_text() -> list[str]:
    words = ["".join(random.Random(i).choice(LETTERS) for _ in range(4)) for i in range(50)]
    return [f"reverse {w} = {w[::-1]}" for w in words] + [string.ascii_lowercase, "user assistant system"]


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
