"""Benchmark: frozen-backbone strategies (linear-probe, partial), tuneforge vs the HF Trainer.

    .venv/bin/python benchmarks/frozen.py --data ../shared/data/sst2 --rows 8000 --epochs 5

MiniLM-L6 on SST-2. For each strategy, ``tuneforge`` (the CLI; ``partial`` with
``strategy.layers: 2`` = encoder layers 4 and 5 + head) and ``hf-expert`` (the Trainer with
bf16, group_by_length and fused AdamW, the same layers frozen by requires_grad=False) run one
after the other, each in its own process. The figure of merit is the wall-time ratio
(goal: HF takes >= 5x as long). See benchmarks/README.md for what differs in the heads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import text  # noqa: E402  (recipe / worker config builders)

CONTENDERS = ("tuneforge", "hf-expert")
STRATEGIES = ("linear-probe", "partial")

COLUMNS = [
    ("contender", "contender", ""), ("strategy", "strategy", ""), ("precision", "precision", ""),
    ("trainable", "trainable_params", ","), ("samples/s", "samples_per_s", ".1f"),
    ("real tok/s", "real_tokens_per_s", ".0f"), ("prep s", "preprocess_s", ".2f"), ("train s", "train_s", ".1f"),
    ("prep+train s", "prep_train_s", ".1f"),
    ("wall s", "wall_s", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f"), ("dev acc", "accuracy", ".4f"),
    ("macro-F1", "f1_macro", ".4f"), ("train s vs tf", "x_train_s", "x"),
    ("prep+train vs tf", "x_prep_train_s", "x"), ("wall s vs tf", "x_wall_s", "x"),
    ("RSS vs tf", "x_peak_rss", "x"), ("other load", "other_cpu_share", "pct"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train.tsv (label, sentence) and dev.tsv (label, content)")
    p.add_argument("--train-text-column", default="sentence")
    p.add_argument("--dev-text-column", default="content")
    p.add_argument("--label-column", default="label")
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--layers", type=int, default=2, help="partial: top layer groups (encoder layers) that train")
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr-linear-probe", type=float, default=1e-3)
    p.add_argument("--lr-partial", type=float, default=2e-4)
    common.add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    train, dev = common.sst2_paths(args.data)
    strategies = common.choices(args.strategies, STRATEGIES, "strategy")
    contenders = common.choices(args.contenders, CONTENDERS, "contender")
    common.configure(args)
    when = common.stamp()
    work = common.Workdir("frozen", when, keep=args.keep_runs)
    model_dir = common.minilm_dir()
    machine = common.machine_info()

    texts, _ = common.read_tsv(train, args.train_text_column, args.label_column, args.rows)
    n_train = len(texts)
    tokens_per_epoch = common.count_tokens(model_dir, texts, args.max_length)
    samples, tokens = round(n_train * args.epochs), round(tokens_per_epoch * args.epochs)
    print(f"SST-2: {n_train} train rows ({tokens_per_epoch} real tokens/epoch), {args.epochs:g} epochs; "
          f"load average {machine['loadavg_at_start']}", flush=True)

    rows = []
    for strategy in strategies:
        lr = args.lr_linear_probe if strategy == "linear-probe" else args.lr_partial
        for contender in contenders:
            name = f"{contender}-{strategy}"
            if contender == "tuneforge":
                recipe = text.tuneforge_recipe(args, "full", lr, train, dev, name)
                recipe["strategy"] = {"name": strategy, **({"layers": args.layers} if strategy == "partial" else {})}
                row = common.run_tuneforge(name, recipe, work)
            else:
                cfg = text.hf_config(args, "expert", strategy, lr, train, dev, model_dir, work.runs / name)
                cfg["partial_layers"] = args.layers
                row = common.run_worker(name, "hf_text.py", cfg, work)
            row.update(contender=contender, strategy=strategy, lr=lr)
            common.add_rates(row, samples, tokens)
            rows.append(row)
    common.add_ratios(rows)
    work.cleanup()

    title = (f"frozen: MiniLM-L6 on SST-2, {n_train} rows x {args.epochs:g} epochs, batch {args.batch_size}, "
             f"partial = top {args.layers} groups, seed {args.seed}  (load avg {common.loadavg()})")
    common.print_table(title, rows, COLUMNS)
    common.write_json(args.output or common.default_output("frozen", when), {
        "benchmark": "frozen", "timestamp": when, "args": vars(args), "machine": machine,
        "data": {"train": str(train), "dev": str(dev), "train_rows": n_train, "real_tokens_per_epoch": tokens_per_epoch},
        "workdir": str(work.path), "results": rows, "loadavg_at_end": common.loadavg(),
    })
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
