"""A tiny random-init causal LM and generated instruction data, for trying the LLM recipes offline.

No pretrained causal LM can be downloaded here, so ``tuneforge make-tiny-lm DIR`` writes a
small Llama-style model (random weights, ~0.3M parameters), a byte-level BPE tokenizer
trained on the generated text (it decodes back to the exact text), and JSONL data for the
"reverse the word" task: ``sft-train.jsonl`` / ``sft-val.jsonl`` (prompt/completion) and
``dpo-train.jsonl`` / ``dpo-val.jsonl`` (prompt/chosen/rejected), ``grpo-train.jsonl`` /
``grpo-val.jsonl`` (prompt/answer). The recipes ``recipes/sft-tiny-*.yaml``,
``recipes/dpo-tiny.yaml`` and ``recipes/grpo-tiny.yaml`` run on it in well under a minute.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
LETTERS = "abcdefgh"


def make_tokenizer(directory, corpus: list[str], vocab_size: int = 300, chat_template: str | None = None,
                   special: list[str] = SPECIAL):
    """A byte-level BPE tokenizer trained on ``corpus`` (decodes to the exact text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def make_lm(directory, tokenizer, family: str = "llama", hidden: int = 64, layers: int = 2, positions: int = 256,
            seed: int = 0):
    """A random-init Llama- or GPT-2-style causal LM saved (safetensors) into ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=positions,
            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4,
                                           n_positions=positions, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    else:
        raise ValueError(f"family must be llama or gpt2, got {family!r}")
    model.save_pretrained(directory, safe_serialization=True)
    return model


def reverse_task(n: int, seed: int) -> list[dict]:
    """'reverse abcd =' -> ' dcba': a task a tiny model learns in seconds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        out.append({"prompt": f"reverse {word} =", "completion": " " + word[::-1]})
    return out


def preference_task(n: int, seed: int) -> list[dict]:
    """The reverse task as preferences: the answer is chosen, the same answer that does not stop
    (" dcba dcba") rejected — the failure preference tuning is often used to remove. A random-init
    model learns this preference in seconds; preferring " dcba" over the word unchanged would
    need the reversal itself learnt first (SFT), which preference pairs alone teach too slowly."""
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] * 2}
            for r in reverse_task(n, seed)]


def prompt_task(n: int, seed: int) -> list[dict]:
    """The reverse task as prompts with their ``answer`` (GRPO data: the model writes, a reward scores)."""
    return [{"prompt": r["prompt"], "answer": r["completion"].strip()} for r in reverse_task(n, seed)]


def corpus_text() -> list[str]:
    words = ["".join(random.Random(i).choice(LETTERS) for _ in range(4)) for i in range(50)]
    return [f"reverse {w} = {w[::-1]}" for w in words] + ["abcdefghijklmnopqrstuvwxyz", "user assistant system"]


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_lm(directory, family: str = "llama", seed: int = 0) -> Path:
    """Model + tokenizer + the example data sets, all in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, corpus_text())
    make_lm(directory, tok, family=family, seed=seed)
    write_jsonl(directory / "sft-train.jsonl", reverse_task(400, seed + 1))
    write_jsonl(directory / "sft-val.jsonl", reverse_task(40, seed + 2))
    write_jsonl(directory / "dpo-train.jsonl", preference_task(200, seed + 3))
    write_jsonl(directory / "dpo-val.jsonl", preference_task(40, seed + 4))
    write_jsonl(directory / "grpo-train.jsonl", prompt_task(200, seed + 5))
    write_jsonl(directory / "grpo-val.jsonl", prompt_task(32, seed + 6))
    return directory
