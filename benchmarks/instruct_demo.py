"""Demonstration: tuneforge's causal-lm machinery really teaches a model to follow an instruction.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/instruct_demo.py --out runs/instruct-demo

Fully offline, everything generated here:

1. a text corpus (simple English sentences and spelled-out words, ``c a t``) and a byte-level
   BPE tokenizer trained on it (as ``tests/llm/lmkit.py`` does);
2. a tiny random Llama (about 0.8M parameters by default), **pre-trained** on the corpus with
   ``task.type: causal-lm, task.format: text`` (packing on);
3. an instruction task the corpus never shows: ``Reverse the letters: c a t`` -> ``t a c``
   (3-5 letters; the held-out words appear in no training text), **instruction-tuned** from the
   pre-trained model with ``strategy: full`` twice — ``task.train_on: completion`` (loss on the
   reply only: loss masking) and ``train_on: all`` (loss on prompt and reply) — and with
   ``strategy: lora`` (masked), all on identical data, steps, learning-rate schedule and seed;
4. greedy exact match on the held-out prompts for the pre-trained model (before SFT) and each
   tuned model, with tuneforge's own generation (``tuneforge.llm.generation.Generator`` on the
   run directory), and each model's loss on the held-out replies.

Prints a table and writes ``DIR/results.json``. About 4 minutes on 2 busy CPU cores with
``--threads 1`` (with torch's default 2 threads, other jobs on the same cores slowed each step
3-5x in our runs: OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIAL = ["<s>", "</s>", "<pad>"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "book", "child", "farmer", "king", "ship", "road",
         "garden", "horse", "teacher", "window", "apple", "stone", "cloud"]
VERBS = ["sees", "finds", "likes", "carries", "paints", "follows", "builds", "reads", "opens", "watches"]
ADJECTIVES = ["small", "old", "red", "quiet", "happy", "tall", "green", "bright", "slow", "cold"]
PLACES = ["in the park", "near the river", "at home", "on the hill", "by the sea", "in the town"]


def spaced(word: str) -> str:
    """Letters separated by spaces: one token per letter for a byte-level BPE (it never merges across a space)."""
    return " ".join(word)


def instruction(word: str) -> dict:
    return {"prompt": f"Reverse the letters: {spaced(word)}\nAnswer:", "completion": " " + spaced(word[::-1])}


def make_words(n: int, rng: random.Random, exclude: set) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def corpus(n_docs: int, rng: random.Random, words: list[str]) -> list[str]:
    """Plain-text documents: short stories and spellings. No reversal, no 'Reverse the letters' prompt."""
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 4)):
            kind = rng.random()
            if kind < 0.5:
                sentences.append(f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
                                 f"{rng.choice(NOUNS)} {rng.choice(PLACES)}.")
            elif kind < 0.8:
                w = rng.choice(words + NOUNS)
                sentences.append(f"the word {w} is spelled {spaced(w)}.")
            else:
                w = rng.choice(words)
                sentences.append(f"the letters: {spaced(w)}. again: {spaced(w)}.")
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(directory: Path, texts: list[str], vocab_size: int):
    """tuneforge's byte-level BPE (``llm.tiny``) with this demo's three special tokens."""
    from tuneforge.llm.tiny import make_tokenizer as byte_level_bpe

    return byte_level_bpe(directory, texts, vocab_size=vocab_size, special=SPECIAL)


def make_model(directory: Path, tokenizer, hidden: int, layers: int, seed: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=2 * hidden, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def recipe(model: str, train: Path, val: Path, out: Path, *, fmt: str, train_on: str = "completion",
           strategy: str = "full", lr: float, epochs: float, batch_size: int, seed: int) -> dict:
    strat = {"name": strategy}
    if strategy == "lora":
        strat.update(rank=16, alpha=32, dropout=0.0, targets="all-linear")  # every projection of the backbone
    return {
        "model": {"name": model},
        "task": {"type": "causal-lm", "format": fmt, "chat_template": "none", "train_on": train_on,
                 "packing": True, "max_length": 128,
                 "generation": {"eval_prompts": 0, "max_new_tokens": 12, "sampled": False}},
        "data": {"train": str(train), "validation": str(val)},
        "strategy": strat,
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "schedule": "cosine", "warmup": 0.05,
                  "weight_decay": 0.0, "seed": seed, "progress": False},
        "output": {"dir": str(out), "overwrite": True, "report": False},
    }


def evaluate(run_dir: Path, test: list[dict]) -> dict:
    """Greedy exact match of the run's saved model on the held-out prompts (tuneforge's own generation,
    ``Generator``), and its loss on the held-out replies (completion + EOS tokens only, for every model
    alike: a run trained with ``train_on: all`` reports a validation loss over prompts too)."""
    import torch

    from tuneforge.deploy.generator import Generator
    from tuneforge.tasks.causal_lm import core_model

    gen = Generator(run_dir)
    replies = gen.complete([t["prompt"] for t in test], greedy=True, max_new_tokens=12)
    rows = [{"prompt": t["prompt"], "reference": t["completion"].strip(), "reply": r} for t, r in zip(test, replies)]
    template, items = gen.task.template, []
    for i, t in enumerate(test):
        conversation = [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["completion"]}]
        ids, labels = template.encode(template.render(conversation, "completion"))
        items.append({"input_ids": ids, "labels": labels, "index": i})
    loss_sum, tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(items), 64):
            batch = gen.task.collate(items[i:i + 64])
            s, n = core_model(gen.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=batch["labels"])
            loss_sum, tokens = loss_sum + float(s), tokens + int(n)
    return {"exact_match": round(sum(r["reply"] == r["reference"] for r in rows) / len(rows), 4),
            "reply_loss": round(loss_sum / max(tokens, 1), 4), "samples": rows}


def run_demo(out: Path, *, seed: int = 0, pretrain_docs: int = 3000, sft_examples: int = 2000,
             test_examples: int = 200, hidden: int = 128, layers: int = 4, vocab_size: int = 400,
             pretrain_epochs: float = 1, pretrain_lr: float = 3e-3, sft_epochs: float = 8, lr: float = 2e-3,
             lora_lr: float = 2e-3, batch_size: int = 4, strategies: tuple = ("full", "lora"), unmasked: bool = True,
             quiet: bool = True, log=print) -> dict:
    """The whole demonstration; returns the results (also written to ``out/results.json``).
    ``unmasked=False`` leaves out the ``train_on: all`` run (the slow test does)."""
    from rich.console import Console

    from tuneforge import finetune

    t_start = time.perf_counter()
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # Disjoint word sets: the held-out words appear in no pre-training text and no SFT example.
    test_words = make_words(test_examples, rng, set())
    sft_words = make_words(sft_examples + 100, rng, set(test_words))
    corpus_words = make_words(600, rng, set(test_words))
    docs = corpus(pretrain_docs, rng, corpus_words)
    split = max(1, len(docs) // 20)
    write_jsonl(data / "pretrain_train.jsonl", [{"text": d} for d in docs[split:]])
    write_jsonl(data / "pretrain_val.jsonl", [{"text": d} for d in docs[:split]])
    sft = [instruction(w) for w in sft_words]
    write_jsonl(data / "sft_train.jsonl", sft[100:])
    write_jsonl(data / "sft_val.jsonl", sft[:100])
    test = [instruction(w) for w in test_words]
    write_jsonl(data / "test.jsonl", test)

    base = out / "base"
    # The tokenizer sees the corpus and the instruction texts (a real one has seen every word, too).
    tok = make_tokenizer(base, docs + [t["prompt"] + t["completion"] for t in sft], vocab_size)
    params = make_model(base, tok, hidden, layers, seed)
    log(f"tiny Llama: {params:,} parameters, vocabulary {len(tok)}; corpus {len(docs)} documents; "
        f"SFT {len(sft) - 100} train / 100 validation; {len(test)} held-out prompts")
    console = Console(stderr=True, quiet=quiet)

    def train(name: str, rec: dict) -> dict:
        t0 = time.perf_counter()
        run = finetune(rec, console=console)
        manifest = json.loads((run.path / "manifest.json").read_text())
        info = {"run": str(run.path), "seconds": round(time.perf_counter() - t0, 1), "steps": manifest.get("steps"),
                "validation_loss": run.metrics["validation"]["loss"]}
        log(f"{name}: {info['steps']} steps in {info['seconds']} s, validation loss {info['validation_loss']:.4f}")
        return info

    runs: dict[str, dict] = {}
    runs["pretrain"] = train("pre-training", recipe(str(base), data / "pretrain_train.jsonl",
                                                     data / "pretrain_val.jsonl", out / "pretrain", fmt="text",
                                                     lr=pretrain_lr, epochs=pretrain_epochs, batch_size=batch_size,
                                                     seed=seed))
    pretrained = str(out / "pretrain" / "model" / "backbone")  # a plain HF model dir: the next run's model.name
    variants = [("sft-full-masked", "full", "completion"), ("sft-full-unmasked", "full", "all"),
                ("sft-lora-masked", "lora", "completion")]
    variants = [v for v in variants if v[1] in strategies and (unmasked or v[2] != "all")]
    for name, strategy, train_on in variants:
        runs[name] = train(name, recipe(pretrained, data / "sft_train.jsonl", data / "sft_val.jsonl", out / name,
                                        fmt="prompt-completion", train_on=train_on, strategy=strategy,
                                        lr=lora_lr if strategy == "lora" else lr, epochs=sft_epochs,
                                        batch_size=batch_size, seed=seed))

    labels = {"pretrain": "pre-trained, before SFT", "sft-full-masked": "SFT full, masked",
              "sft-full-unmasked": "SFT full, unmasked", "sft-lora-masked": "SFT LoRA, masked"}
    results, samples = [], {}
    for name in ["pretrain"] + [v[0] for v in variants]:
        scores = evaluate(out / name, test)
        v = next((v for v in variants if v[0] == name), (name, "-", "-"))
        results.append({"model": labels[name], "run": name, "strategy": v[1], "train_on": v[2],
                        "exact_match": scores["exact_match"], "reply_loss": scores["reply_loss"],
                        **{k: runs[name][k] for k in ("steps", "seconds")}})
        samples[name] = scores["samples"][:5]
        log(f"{name}: held-out exact match {scores['exact_match']:.3f}, reply loss {scores['reply_loss']:.4f}")
    payload = {"task": "reverse the letters of a held-out 3-5 letter word", "seed": seed, "parameters": params,
               "sizes": {"pretrain_docs": pretrain_docs, "sft_examples": sft_examples, "test": test_examples,
                         "hidden": hidden, "layers": layers, "vocab": len(tok)},
               "hyperparameters": {"pretrain_lr": pretrain_lr, "lr": lr, "lora_lr": lora_lr,
                                   "batch_size": batch_size, "pretrain_epochs": pretrain_epochs,
                                   "sft_epochs": sft_epochs},
               "results": results, "runs": runs, "samples": samples,
               "total_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    return payload


def print_table(payload: dict) -> None:
    print(f"\nheld-out exact match ({payload['sizes']['test']} prompts, greedy), "
          f"{payload['parameters']:,}-parameter Llama, seed {payload['seed']}:")
    print(f"  {'model':<26} {'exact match':>11} {'reply loss':>10} {'steps':>6} {'run s':>6}")
    for r in payload["results"]:
        print(f"  {r['model']:<26} {r['exact_match']:>11.3f} {r['reply_loss']:>10.4f} {r['steps'] or 0:>6} "
              f"{r['seconds']:>6.1f}")
    for name, rows in payload["samples"].items():
        r = rows[0]
        print(f"  {name}: {r['prompt']!r} -> {r['reply']!r} (reference {r['reference']!r})")
    print(f"total {payload['total_seconds']} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for data, runs and results.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-docs", type=int, default=3000)
    p.add_argument("--sft-examples", type=int, default=2000)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=float, default=1)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--sft-epochs", type=float, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="SFT learning rate, full strategy")
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows of 128 tokens per step")
    p.add_argument("--strategies", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own); 1 is much faster on a machine other jobs keep busy")
    p.add_argument("--verbose", action="store_true", help="show tuneforge's own log of each run")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    payload = run_demo(a.out, seed=a.seed, pretrain_docs=a.pretrain_docs, sft_examples=a.sft_examples,
                       test_examples=a.test_examples, hidden=a.hidden, layers=a.layers,
                       pretrain_epochs=a.pretrain_epochs, pretrain_lr=a.pretrain_lr, sft_epochs=a.sft_epochs,
                       lr=a.lr, lora_lr=a.lora_lr, batch_size=a.batch_size,
                       strategies=tuple(s.strip() for s in a.strategies.split(",")), quiet=not a.verbose)
    print_table(payload)
    print(f"results: {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
