"""Benchmark: text classification (MiniLM-L6 on SST-2), tuneforge vs the Hugging Face Trainer.

    .venv/bin/python benchmarks/text.py --data ../shared/data/sst2 --rows 8000

For each strategy (full, lora) runs, one after the other, each in its own process:
``tuneforge`` (the CLI), ``hf-default`` (Trainer defaults) and ``hf-expert`` (bf16,
group_by_length, fused AdamW), on the same rows, model, batch size, learning rate,
schedule (linear, 10% warmup), epochs, max length and seed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONTENDERS = ("tuneforge", "hf-default", "hf-expert")
DEFAULT_LR = {"full": 2e-4, "lora": 1e-3}
LORA = {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": ["query", "key", "value", "dense"]}

COLUMNS = [
    ("contender", "contender", ""), ("strategy", "strategy", ""), ("precision", "precision", ""),
    ("samples/s", "samples_per_s", ".1f"), ("real tok/s", "real_tokens_per_s", ".0f"),
    ("pad", "padding_fraction", "pct"), ("prep s", "preprocess_s", ".2f"), ("load s", "model_load_s", ".1f"),
    ("train s", "train_s", ".1f"), ("wall s", "wall_s", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("dev acc", "accuracy", ".4f"), ("macro-F1", "f1_macro", ".4f"),
    ("samples/s vs tf", "x_samples_per_s", "x"), ("train s vs tf", "x_train_s", "x"),
    ("prep+train vs tf", "x_prep_train_s", "x"), ("RSS vs tf", "x_peak_rss", "x"), ("other load", "other_cpu_share", "pct"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train.tsv (label, sentence) and dev.tsv (label, content)")
    p.add_argument("--train-text-column", default="sentence")
    p.add_argument("--dev-text-column", default="content")
    p.add_argument("--label-column", default="label")
    p.add_argument("--rows", type=int, default=8000, help="first N training rows (the full dev set is always used)")
    p.add_argument("--strategies", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr-full", type=float, default=DEFAULT_LR["full"])
    p.add_argument("--lr-lora", type=float, default=DEFAULT_LR["lora"])
    common.add_common_args(p, before_after=True)
    return p.parse_args(argv)


def tuneforge_recipe(args, strategy: str, lr: float, train: Path, dev: Path, run_name: str) -> dict:
    strat = {"name": strategy}
    if strategy == "lora":
        strat.update(LORA)
    return {
        "model": {"name": "minilm-l6"},
        "task": {"type": "text-classification", "max_length": args.max_length},
        "data": {"train": str(train), "validation": str(dev), "text_column": args.train_text_column,
                 "label_column": args.label_column, "columns": {"validation": {"text_column": args.dev_text_column}},
                 "max_train_rows": args.rows},
        "strategy": strat,
        # head_lr = lr: the HF contenders have one learning rate for everything.
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                  "lr": lr, "head_lr": lr, "schedule": "linear", "warmup": args.warmup, "weight_decay": 0.01,
                  "seed": args.seed, "progress": False},
        "output": {"name": run_name},
    }


def hf_config(args, mode: str, strategy: str, lr: float, train: Path, dev: Path, model_dir: str, out: Path) -> dict:
    return {"mode": mode, "strategy": strategy, "model_dir": model_dir, "train_path": str(train), "dev_path": str(dev),
            "train_text_column": args.train_text_column, "dev_text_column": args.dev_text_column,
            "label_column": args.label_column, "rows": args.rows, "max_length": args.max_length,
            "epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
            "lr": lr, "warmup": args.warmup, "seed": args.seed, "weight_decay": 0.01, "lora": LORA,
            "output_dir": str(out)}


def main(argv=None) -> int:
    args = parse_args(argv)
    train, dev = common.sst2_paths(args.data)
    strategies = common.choices(args.strategies, DEFAULT_LR, "strategy")
    contenders = common.choices(args.contenders, CONTENDERS, "contender")
    common.configure(args)
    when = common.stamp()
    work = common.Workdir("text", when, keep=args.keep_runs)
    model_dir = common.minilm_dir()
    machine = common.machine_info()

    # Real tokens, counted once with the same tokenizer and truncation for everyone.
    texts, _ = common.read_tsv(train, args.train_text_column, args.label_column, args.rows)
    n_train = len(texts)
    tokens_per_epoch = common.count_tokens(model_dir, texts, args.max_length)
    samples = round(n_train * args.epochs)
    tokens = round(tokens_per_epoch * args.epochs)
    print(f"SST-2: {n_train} train rows ({tokens_per_epoch} real tokens/epoch), dev {dev}; "
          f"load average {machine['loadavg_at_start']}", flush=True)

    if args.baseline_src and "tuneforge" in contenders:
        contenders.insert(contenders.index("tuneforge") + 1, "tuneforge-baseline")
    rows = []
    for strategy in strategies:
        lr = args.lr_full if strategy == "full" else args.lr_lora
        for round_, contender in [(r, c) for r in range(args.rounds) for c in contenders]:  # interleaved
            name = f"{contender}-{strategy}" + (f"-r{round_}" if args.rounds > 1 else "")
            if contender in ("tuneforge", "tuneforge-baseline"):
                src = args.baseline_src if contender == "tuneforge-baseline" else None
                row = common.run_tuneforge(name, tuneforge_recipe(args, strategy, lr, train, dev, name), work, src=src)
            else:
                mode = contender.split("-", 1)[1]
                row = common.run_worker(name, "hf_text.py",
                                        hf_config(args, mode, strategy, lr, train, dev, model_dir, work.runs / name),
                                        work)
            row.update(contender=contender, strategy=strategy, lr=lr, round=round_)
            common.add_rates(row, samples, tokens)
            rows.append(row)
    common.add_ratios(rows)
    work.cleanup()

    title = (f"text: MiniLM-L6 on SST-2, {n_train} rows x {args.epochs:g} epoch(s), batch {args.batch_size}, "
             f"max_length {args.max_length}, seed {args.seed}  (load avg {common.loadavg()})")
    common.print_table(title, rows, COLUMNS)
    common.write_json(args.output or common.default_output("text", when), {
        "benchmark": "text", "timestamp": when, "args": vars(args), "machine": machine,
        "data": {"train": str(train), "dev": str(dev), "train_rows": n_train, "real_tokens_per_epoch": tokens_per_epoch},
        "workdir": str(work.path), "results": rows, "loadavg_at_end": common.loadavg(),
    })
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
