"""A toy decoder LLM and toy data, built on the spot: the LLM recipes run without a download.

``python -m tuneforge.llm.toy DIR`` writes ``DIR/model`` (a 2-layer, 64-wide Llama with a
byte-level BPE tokenizer trained on the task's alphabet, random weights) and
``DIR/train.jsonl`` / ``DIR/validation.jsonl``: preference pairs for "reverse abc =",
the chosen reply the right answer " cba", the rejected one the same answer that does
not stop (" cba cba") — the failure that preference tuning is often used to remove.
The model is untrained, so only what the run teaches it shows; seconds on a CPU.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

LETTERS = "abcdefgh"
SPECIAL = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def build_toy_lm(directory, *, hidden: int = 64, layers: int = 2, positions: int = 256, init: float = 0.1,
                 seed: int = 0) -> Path:
    """A saved Llama-style model + tokenizer with random weights (a Hugging Face directory).

    ``init``: the weights' std. Wider than Llama's 0.02, so the frozen LM head of a LoRA run
    can still move the log-probs: at 0.02 a random head bounds every logit near zero, which
    a pretrained head does not."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    rng = random.Random(seed)
    corpus = [f"reverse {w} = {w[::-1]}" for w in (_word(rng) for _ in range(50))]
    corpus += ["abcdefghijklmnopqrstuvwxyz", "user assistant system"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=positions,
        tie_word_embeddings=False, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, initializer_range=init))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def preference_pairs(n: int, seed: int) -> list[dict]:
    """``{"prompt": "reverse abc =", "chosen": " cba", "rejected": " cba cba"}`` records."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = _word(rng)
        answer = " " + word[::-1]
        out.append({"prompt": f"reverse {word} =", "chosen": answer, "rejected": answer * 2})
    return out


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_toy_preference(directory, *, train: int = 64, validation: int = 16) -> dict:
    """``DIR/model``, ``DIR/train.jsonl``, ``DIR/validation.jsonl``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {"model": build_toy_lm(directory / "model"),
            "train": write_jsonl(directory / "train.jsonl", preference_pairs(train, seed=1)),
            "validation": write_jsonl(directory / "validation.jsonl", preference_pairs(validation, seed=2))}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tuneforge.llm.toy DIR   (writes DIR/model, DIR/train.jsonl, DIR/validation.jsonl)")
    for name, path in write_toy_preference(sys.argv[1]).items():
        print(f"{name}: {path}")
