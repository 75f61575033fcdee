"""Benchmark: an LLM as a classifier on real weights. SmolLM2-135M-Instruct on SST-2, by its label
words (``classifier: label-words``) and by a head on the last token (``pooling: last``), against
MiniLM-L6 with a head, on the same rows.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_classifier.py --data ../shared/data/sst2 \\
        --smollm2 smollm2-135m --rows 2000

Every contender is ``tuneforge train`` in its own process (common.run_tuneforge): the first
``--rows`` rows of train.tsv, the whole dev set (872 sentences) for validation, one epoch,
batch 16, linear schedule with 10% warmup, seed 42, bf16 autocast (the CPU's native format):

* ``smollm2-label-words`` (LoRA r16 on q/k/v/o + gate/up/down, lr 5e-4): each sentence is
  followed by ``"\\nSentiment:"``; the LM scores " negative" / " positive" (one token each),
  so it classifies before its first step: ``train.eval_before`` records that zero-shot
  accuracy as step 0;
* ``smollm2-last-head`` (the same LoRA, lr 5e-4; the new head 5e-3): a linear head on the last
  real token's hidden state;
* ``minilm-head`` (``full``, lr 2e-4, head 2e-3: the shipped sst2-minilm recipe's rates).

Reported: dev accuracy (best checkpoint: eval.json; final evaluation and, for label words, the
zero-shot step 0), training time (fit minus its evaluations), wall time, peak RSS (measured from
outside), and the other load on the machine while each ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONTENDERS = ("smollm2-label-words", "smollm2-last-head", "minilm-head")
SMOLLM2_LORA = {"name": "lora", "rank": 16, "alpha": 32, "dropout": 0.05}

COLUMNS = [
    ("contender", "contender", ""), ("strategy", "strategy", ""), ("steps", "steps", ""),
    ("zero-shot acc", "zero_shot_accuracy", ".4f"), ("dev acc (best)", "best_accuracy", ".4f"),
    ("dev acc (final)", "accuracy", ".4f"), ("macro-F1", "best_f1_macro", ".4f"),
    ("train s", "train_s", ".1f"), ("wall s", "wall_s", ".1f"), ("samples/s", "samples_per_s", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"), ("other load", "other_cpu_share", "pct"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train.tsv (label, sentence) and dev.tsv (label, content)")
    p.add_argument("--smollm2", required=True, help="SmolLM2-135M-Instruct: a local HF directory (or its alias)")
    p.add_argument("--rows", type=int, default=2000, help="first N training rows (the whole dev set validates)")
    p.add_argument("--eval-rows", type=int, default=None, help="first N dev rows (default: all 872)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--epochs", type=float, default=1)
    common.add_common_args(p)
    return p.parse_args(argv)


def recipe(args, contender: str, train: Path, dev: Path) -> dict:
    task: dict = {"type": "text-classification", "max_length": args.max_length}
    train_cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": 2 * args.batch_size,
                 "schedule": "linear", "warmup": args.warmup, "seed": args.seed, "metric_for_best": "accuracy",
                 "progress": False}
    if contender == "smollm2-label-words":
        model, strategy = args.smollm2, dict(SMOLLM2_LORA)
        task.update(classifier="label-words", label_prompt="\nSentiment:", label_words={"0": "negative", "1": "positive"})
        train_cfg.update(lr=5e-4, eval_before=True)  # the LM's own zero-shot accuracy as step 0
    elif contender == "smollm2-last-head":
        model, strategy = args.smollm2, dict(SMOLLM2_LORA)
        task.update(pooling="last")
        train_cfg.update(lr=5e-4, head_lr=5e-3)
    else:
        model, strategy = "minilm-l6", {"name": "full"}
        train_cfg.update(lr=2e-4, head_lr=2e-3)
    data = {"train": str(train), "validation": str(dev), "text_column": args.train_text_column,
            "label_column": "label", "columns": {"validation": {"text_column": args.dev_text_column}},
            "max_train_rows": args.rows}
    if args.eval_rows:
        data["max_eval_rows"] = args.eval_rows
    return {"model": {"name": model}, "task": task, "data": data, "strategy": strategy, "train": train_cfg,
            "output": {"report": False}}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.train_text_column, args.dev_text_column = "sentence", "content"
    contenders = common.choices(args.contenders, CONTENDERS, "contender")
    common.configure(args)
    train, dev = common.sst2_paths(args.data)
    when = common.stamp()
    work = common.Workdir("llm-classifier", when, keep=args.keep_runs)
    machine = common.machine_info()
    print(f"SST-2: first {args.rows} train rows, dev {args.eval_rows or 'all'}; load average {machine['loadavg_at_start']}",
          flush=True)
    rows = []
    for contender in contenders:
        r = recipe(args, contender, train, dev)
        row = common.run_tuneforge(contender, r, work)
        row.update(contender=contender, strategy=r["strategy"]["name"], loadavg_end=common.loadavg())
        common.add_rates(row, round(args.rows * args.epochs))
        if row.get("ok"):
            evals = row.get("evals") or []
            if evals and evals[0]["step"] == 0:
                row["zero_shot_accuracy"] = evals[0]["accuracy"]
        rows.append(row)
    work.cleanup()
    title = (f"llm-classifier: SST-2, {args.rows} train rows x {args.epochs:g} epoch, dev {args.eval_rows or 872}, "
             f"batch {args.batch_size}, seed {args.seed}  (load avg {common.loadavg()})")
    common.print_table(title, rows, COLUMNS)
    common.write_json(args.output or common.default_output("llm-classifier", when), {
        "benchmark": "llm-classifier", "timestamp": when, "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine, "workdir": str(work.path), "results": rows, "loadavg_at_end": common.loadavg()})
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
