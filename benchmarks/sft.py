"""Benchmark: LLM supervised fine-tuning, tuneforge against TRL's SFTTrainer (+ PEFT for LoRA).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft.py                 # full + lora, ~10 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft.py --examples 300 --strategies full   # smoke run
    # real weights: SmolLM2-135M-Instruct (a local HF directory) on Alpaca rows, its own chat template
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft.py --model smollm2-135m \
        --alpaca ../shared/data/instruct/alpaca_en_demo.json --examples 96 --eval-examples 32 --rounds 2

Needs the ``bench`` extra (``pip install -e .[bench]``: TRL). Fully offline; generated here:

* an instruction set of prompt/completion pairs with a realistic length spread (log-normal
  list lengths, optional context paragraphs: prompts of ~10 to ~400 tokens, replies of 2 to
  ~300), whose tasks a model can learn (repeat / reverse / sort a word list, first letters,
  counting), plus a held-out validation set of the same kind; every example fits in
  ``--max-length`` tokens, so neither side truncates and both train on exactly the same tokens;
* a byte-level BPE tokenizer trained on that data (no BOS token, so both sides tokenise a
  prompt + completion + EOS into the same ids) and a random-init Llama saved once; both
  contenders load the same weights.

With ``--model DIR --alpaca FILE`` (real weights) the model is that directory (e.g. SmolLM2-135M-
Instruct) and the data are Alpaca rows: the prompt is the instruction (and input) rendered by the
model's own chat template with its generation prompt, the completion the reply (both sides then
append the tokenizer's EOS, ``<|im_end|>`` for SmolLM2, and tokenise the same text the same way);
the first ``--examples`` rows that fit ``--max-length`` train, the next ``--eval-examples`` are held
out. Default rates there: full 5e-5, LoRA 1e-3.

For each strategy (full, lora) runs, one after the other, each in its own process:
``tuneforge`` (``tuneforge train``, task causal-lm, packing on) and ``trl`` (``trl_sft.py``:
``SFTTrainer`` with ``packing=True``, i.e. best-fit-decreasing packing with padding-free
position-id batches, ``completion_only_loss=True``), on the same data, model, rows per batch,
learning rate, schedule (linear, 10% warmup), weight decay, clipping, epochs, max length and
seed, bf16 autocast on CPU for both, fused AdamW for both. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONTENDERS = ("tuneforge", "trl")
DEFAULT_LR = {"full": 1e-3, "lora": 2e-3}
REAL_LR = {"full": 5e-5, "lora": 1e-3}  # pretrained weights: full fine-tuning moves every weight, far less far
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

COLUMNS = [
    ("contender", "contender", ""), ("strategy", "strategy", ""), ("steps", "steps", ""),
    ("real tok/s", "real_tokens_per_s", ".0f"), ("samples/s", "samples_per_s", ".1f"),
    ("prep s", "preprocess_s", ".2f"), ("train s", "train_s", ".1f"), ("wall s", "wall_s", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"), ("train loss", "mean_train_loss", ".4f"),
    ("last-10 loss", "final_train_loss", ".4f"),
    ("eval loss", "eval_loss", ".4f"), ("tok/s vs tf", "x_real_tokens_per_s", "x"),
    ("train s vs tf", "x_train_s", "x"), ("RSS vs tf", "x_peak_rss", "x"), ("other load", "other_cpu_share", "pct"),
]

# ----------------------------------------------------------------------------- data

CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"
# 90 open syllables + 160 closed ones: 6,000 made-up words, enough text for an 8k BPE vocabulary.
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS] + [c + v + e for c in CONSONANTS[:8] for v in VOWELS
                                                           for e in "nrst"]
TASKS = ("repeat", "reverse", "sort", "initials", "count")
INSTRUCTIONS = {
    "repeat": "Repeat the following words exactly.",
    "reverse": "Write the following words in reverse order.",
    "sort": "Sort the following words alphabetically.",
    "initials": "Write the first letter of each of the following words.",
    "count": "How many words are in the following list?",
}


def make_vocabulary(rng: random.Random, n: int = 6000) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def make_example(rng: random.Random, words: list[str]) -> dict:
    """One prompt/completion pair; list and context lengths are log-normal, as in real instruction sets."""
    task = rng.choice(TASKS)
    n = max(2, min(150, int(rng.lognormvariate(2.5, 0.8))))  # median ~12 words, long tail
    items = [rng.choice(words) for _ in range(n)]
    context = ""
    if rng.random() < 0.4:  # a context paragraph the reply does not depend on (real prompts carry such text)
        m = max(5, min(200, int(rng.lognormvariate(3.3, 0.7))))
        context = "Context: " + " ".join(rng.choice(words) for _ in range(m)) + ".\n"
    prompt = f"{context}{INSTRUCTIONS[task]}\nWords: {' '.join(items)}\nAnswer:"
    reply = {"repeat": items, "reverse": items[::-1], "sort": sorted(items), "initials": [w[0] for w in items],
             "count": [str(n)]}[task]
    return {"prompt": prompt, "completion": " " + " ".join(reply)}


def make_real_data(args, work: Path) -> dict:
    """``--model`` / ``--alpaca``: Alpaca rows as prompt/completion pairs in the model's own chat
    template; the first ``--examples`` that fit ``--max-length`` train, the next ``--eval-examples`` validate."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    eos = tok.eos_token_id
    rows = json.loads(Path(args.alpaca).read_text(encoding="utf-8"))
    kept, lengths, targets = [], [], []
    for r in rows:
        user = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r.get("input", "").strip() else "")
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        e = {"prompt": prompt, "completion": r["output"].strip()}
        ids = tok(e["prompt"] + e["completion"], add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) <= args.max_length:
            kept.append(e)
            lengths.append(len(ids))
            targets.append(len(ids) - len(tok(e["prompt"], add_special_tokens=False)["input_ids"]))
        if len(kept) == args.examples + args.eval_examples:
            break
    if len(kept) < args.examples + args.eval_examples:
        raise SystemExit(f"only {len(kept)} Alpaca rows fit --max-length {args.max_length}; lower --examples")
    n = args.examples
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, dev = data / "train.jsonl", data / "validation.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in kept[:n]))
    dev.write_text("".join(json.dumps(e) + "\n" for e in kept[n:]))
    params = 0
    for f in Path(args.model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            params += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    lens = sorted(lengths[:n])
    return {"train": train, "validation": dev, "model_dir": Path(args.model), "parameters": params, "vocab": len(tok),
            "train_examples": n, "eval_examples": args.eval_examples, "real_weights": True,
            "real_tokens_per_epoch": sum(lengths[:n]), "target_tokens_per_epoch": sum(targets[:n]),
            "length_percentiles": {p: lens[min(len(lens) - 1, int(p / 100 * len(lens)))] for p in (5, 25, 50, 75, 95)},
            "length_max": lens[-1]}


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def make_data(args, work: Path) -> dict:
    """Train/validation JSONL, tokenizer and a random-init Llama in ``work``; every example fits max_length."""
    if args.model:
        return make_real_data(args, work)
    rng = random.Random(args.seed)
    words = make_vocabulary(rng)
    pool = [make_example(rng, words) for _ in range(int((args.examples + args.eval_examples) * 1.3) + 50)]
    model_dir = work / "model"
    tok = make_tokenizer(model_dir, [e["prompt"] + e["completion"] for e in pool], args.vocab_size)
    eos = tok.eos_token_id
    kept, lengths, targets = [], [], []
    for e in pool:
        ids = tok(e["prompt"] + e["completion"], add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) <= args.max_length:
            n_prompt = len(tok(e["prompt"], add_special_tokens=False)["input_ids"])
            kept.append(e)
            lengths.append(len(ids))
            targets.append(len(ids) - n_prompt)
    if len(kept) < args.examples + args.eval_examples:
        raise SystemExit("not enough examples fit --max-length; raise it or lower --examples")
    n = args.examples
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, dev = data / "train.jsonl", data / "validation.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in kept[:n]))
    dev.write_text("".join(json.dumps(e) + "\n" for e in kept[n:n + args.eval_examples]))
    params = make_model(model_dir, tok, args)
    lens = sorted(lengths[:n])
    return {"train": train, "validation": dev, "model_dir": model_dir, "parameters": params, "vocab": len(tok),
            "train_examples": n, "eval_examples": args.eval_examples,
            # prompt + completion + EOS, the same ids on both sides (no BOS; no truncation)
            "real_tokens_per_epoch": sum(lengths[:n]), "target_tokens_per_epoch": sum(targets[:n]),
            "length_percentiles": {p: lens[min(len(lens) - 1, int(p / 100 * len(lens)))] for p in (5, 25, 50, 75, 95)},
            "length_max": lens[-1]}


def make_tokenizer(directory: Path, texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # No BOS: TRL tokenises prompt-completion pairs without special tokens, tuneforge's `none`
    # template adds the tokenizer's BOS when it has one; without one both produce the same ids.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def make_model(directory: Path, tok, args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        intermediate_size=int(args.hidden * 8 / 3) // 32 * 32, max_position_embeddings=max(1024, args.max_length),
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None))
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- contenders


def tuneforge_recipe(args, strategy: str, lr: float, d: dict, run_name: str) -> dict:
    strat = {"name": strategy}
    if strategy == "lora":
        strat.update(LORA)
    return {
        "model": {"name": str(d["model_dir"])},
        "task": {"type": "causal-lm", "format": "prompt-completion", "chat_template": "none", "train_on": "completion",
                 "packing": True, "max_length": args.max_length, "generation": {"eval_prompts": 0}},
        "data": {"train": str(d["train"]), "validation": str(d["validation"])},
        "strategy": strat,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.batch_size,
                  "lr": lr, "schedule": "linear", "warmup": args.warmup, "weight_decay": 0.01,
                  "max_grad_norm": 1.0, "seed": args.seed, "log_every": 10, "progress": False,
                  "eval_before": False},  # TRL evaluates nothing before training: the same work on both sides
        "output": {"name": run_name, "report": False},
    }


def trl_config(args, strategy: str, lr: float, d: dict, out: Path) -> dict:
    return {"strategy": strategy, "model_dir": str(d["model_dir"]), "train_path": str(d["train"]),
            "dev_path": str(d["validation"]), "max_length": args.max_length, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": lr, "warmup": args.warmup, "seed": args.seed, "weight_decay": 0.01,
            "lora": LORA, "output_dir": str(out)}


def train_losses(row: dict, run_dir: Path) -> dict:
    """The mean training loss over every step, and over the last logging interval (10 steps;
    tuneforge also logs the epoch's last, shorter interval, TRL does not: their windows differ)."""
    if row["contender"] == "tuneforge":
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train, last, total = [e for e in events if e.get("event") == "train"], 0, 0.0
        for e in train:  # each event: the mean over the steps since the previous one
            total, last = total + e["loss"] * (e["step"] - last), e["step"]
        return {"mean_train_loss": total / last if last else None, "final_train_loss": row.get("train_loss_last")}
    history = row.get("log_history") or []
    return {"mean_train_loss": row.get("train_loss_mean"), "final_train_loss": history[-1]["loss"] if history else None}


def median_rows(rows: list[dict]) -> list[dict]:
    """Per (strategy, contender), the median over rounds of every figure in the table."""
    import statistics

    out = []
    for key in dict.fromkeys((r["strategy"], r["contender"]) for r in rows):
        group = [r for r in rows if (r["strategy"], r["contender"]) == key and r.get("ok")]
        if not group:
            continue
        row = {"ok": True, "strategy": key[0], "contender": key[1], "rounds": len(group)}
        for _, field, _ in COLUMNS:
            values = [r[field] for r in group if isinstance(r.get(field), (int, float))]
            if values and field not in ("contender", "strategy"):
                row[field] = statistics.median(values)
        out.append(row)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2500, help="training examples")
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples (eval loss)")
    p.add_argument("--strategies", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of tuneforge, trl")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows of --max-length tokens per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every contender (default: unset, torch uses one thread per core); "
                        "on a machine other jobs keep busy, 1 thread is steadier and was 2-3x faster here")
    p.add_argument("--lr-full", type=float, default=None, help=f"default {DEFAULT_LR['full']} ({REAL_LR['full']} with --model)")
    p.add_argument("--lr-lora", type=float, default=None, help=f"default {DEFAULT_LR['lora']} ({REAL_LR['lora']} with --model)")
    p.add_argument("--model", default=None, help="real weights: an LLM alias (smollm2-135m) or a local Hugging Face causal-LM directory (needs --alpaca)")
    p.add_argument("--alpaca", default=None, help="with --model: an Alpaca JSON file ({instruction, input, output} rows)")
    p.add_argument("--rounds", type=int, default=1, help="run every contender this many times, interleaved (A B A B)")
    common.add_common_args(p)
    args = p.parse_args(argv)
    if args.model:  # an LLM alias -> its converted directory: the TRL side reads the files itself
        from tuneforge.models.aliases import ALIASES, llm_alias_dir

        if args.model in ALIASES:
            args.model = str(llm_alias_dir(args.model))
    if bool(args.model) != bool(args.alpaca):
        p.error("--model and --alpaca go together (real weights on Alpaca rows)")
    rates = REAL_LR if args.model else DEFAULT_LR
    args.lr_full = args.lr_full or rates["full"]
    args.lr_lora = args.lr_lora or rates["lora"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    strategies = common.choices(args.strategies, DEFAULT_LR, "strategy")
    contenders = common.choices(args.contenders, CONTENDERS, "contender")
    common.configure(args)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every contender's process
    when = common.stamp()
    work = common.Workdir("sft", when, keep=args.keep_runs)
    machine = common.machine_info()
    d = make_data(args, work.path)
    samples = round(d["train_examples"] * args.epochs)
    tokens = round(d["real_tokens_per_epoch"] * args.epochs)
    print(f"SFT data: {d['train_examples']} train examples, {d['real_tokens_per_epoch']} real tokens/epoch "
          f"({d['target_tokens_per_epoch']} carry loss), lengths p5/p50/p95 {d['length_percentiles'][5]}/"
          f"{d['length_percentiles'][50]}/{d['length_percentiles'][95]} (max {d['length_max']}); model: random Llama, "
          f"{d['parameters']:,} parameters, vocabulary {d['vocab']}; load average {machine['loadavg_at_start']}",
          flush=True)

    rows = []
    for round_ in range(1, args.rounds + 1):  # interleaved: A B A B, so a change in load hits both sides
        for strategy in strategies:
            lr = args.lr_full if strategy == "full" else args.lr_lora
            for contender in contenders:
                name = f"{contender}-{strategy}" + (f"-r{round_}" if args.rounds > 1 else "")
                if contender == "tuneforge":
                    row = common.run_tuneforge(name, tuneforge_recipe(args, strategy, lr, d, name), work)
                else:
                    row = common.run_worker(name, "trl_sft.py", trl_config(args, strategy, lr, d, work.runs / name),
                                            work)
                row.update(contender=contender, strategy=strategy, lr=lr, round=round_, loadavg_end=common.loadavg())
                common.add_rates(row, samples, tokens)
                if row.get("ok"):
                    row.update(train_losses(row, work.runs / name))
                rows.append(row)
    common.add_ratios(rows)
    for row in rows:  # tokens/s of tuneforge over the contender's: > 1 means tuneforge is faster
        ref = next((r for r in rows if r["strategy"] == row["strategy"] and r["contender"] == "tuneforge"
                    and r.get("round") == row.get("round") and r.get("ok")), None)
        if ref and row.get("ok") and row.get("real_tokens_per_s"):
            row["x_real_tokens_per_s"] = round(row["real_tokens_per_s"] / ref["real_tokens_per_s"], 3)
            row["tuneforge_speedup"] = round(ref["real_tokens_per_s"] / row["real_tokens_per_s"], 3)
    work.cleanup()

    medians = median_rows(rows) if args.rounds > 1 else []
    what = f"{Path(args.model).name} (real weights)" if args.model else "random Llama"
    title = (f"sft: {what} {d['parameters'] / 1e6:.1f}M, {d['train_examples']} examples x {args.epochs:g} "
             f"epoch(s), packed rows of {args.max_length}, batch {args.batch_size}, seed {args.seed}  "
             f"(load avg {common.loadavg()})")
    common.print_table(title, rows, COLUMNS)
    if medians:
        common.print_table(f"median of {args.rounds} rounds", medians, COLUMNS)
    name = "sft-real" if args.model else "sft"
    common.write_json(args.output or common.default_output(name, when), {
        "benchmark": name, "timestamp": when, "args": vars(args), "machine": machine, "medians": medians,
        "data": {k: str(v) if isinstance(v, Path) else v for k, v in d.items()},
        "workdir": str(work.path), "results": rows, "loadavg_at_end": common.loadavg(),
    })
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
