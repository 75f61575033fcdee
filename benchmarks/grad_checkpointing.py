"""Benchmark: gradient checkpointing on a real LLM, on and off, LoRA and full (the evidence behind
``train.gradient_checkpointing: auto``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grad_checkpointing.py --model smollm2-135m \\
        --data sft-data/train.jsonl --steps 4

Each (strategy, checkpointing) pair is ``tuneforge train`` in its own process (so peak RSS is
that configuration's own, measured from outside): ``--steps`` optimizer steps of ``--batch-size``
packed rows of ``--max-length`` tokens, bf16 autocast, no evaluation before, 4 validation rows,
no generation. Step time: the median seconds per step of the logged steps after the first
(``log_every: 1``; the first step also counts FLOPs for MFU). Interleaved: off/on alternate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = [("strategy", "strategy", ""), ("checkpointing", "checkpointing", ""), ("s/step", "step_s", ".1f"),
           ("tok/s", "tokens_per_s", ".0f"), ("peak RSS MB", "peak_rss_mb", ".0f"), ("wall s", "wall_s", ".0f"),
           ("other load", "other_cpu_share", "pct")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="causal-lm training data (JSONL), e.g. make-sft-data's train.jsonl")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--strategies", default="lora,full")
    common.add_common_args(p)
    args = p.parse_args(argv)
    common.configure(args)
    when = common.stamp()
    work = common.Workdir("grad-checkpointing", when, keep=args.keep_runs)
    machine = common.machine_info()
    rows = []
    for strategy in common.split_list(args.strategies):
        for on in (False, True):
            name = f"{strategy}-{'on' if on else 'off'}"
            recipe = {"model": {"name": args.model},
                      "task": {"type": "causal-lm", "chat_template": "tokenizer", "max_length": args.max_length,
                               "generation": {"eval_prompts": 0}},
                      "data": {"train": args.data, "validation": args.data, "max_eval_rows": 4,
                               "max_train_rows": args.steps * args.batch_size * 4},
                      "strategy": {"name": strategy},
                      "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4, "log_every": 1,
                                "eval_before": False, "gradient_checkpointing": on, "progress": False,
                                "seed": args.seed},
                      "output": {"report": False, "save_model": False}}
            row = common.run_tuneforge(name, recipe, work)
            row.update(strategy=strategy, checkpointing="on" if on else "off", loadavg_end=common.loadavg())
            if row.get("ok"):
                events = [json.loads(line) for line in (work.runs / name / "metrics.jsonl").read_text().splitlines()]
                steps = [e for e in events if e.get("event") == "train"][1:]
                times = [e["elapsed_s"] for e in [e for e in events if e.get("event") == "train"]]
                gaps = [b - a for a, b in zip(times, times[1:])]
                row["step_s"] = statistics.median(gaps) if gaps else None
                row["tokens_per_s"] = statistics.median(e["tokens_per_s"] for e in steps) if steps else None
            rows.append(row)
    work.cleanup()
    common.print_table(f"gradient checkpointing: {Path(args.model).name}, {args.batch_size} x {args.max_length} "
                       f"tokens, {args.steps} steps (load avg {common.loadavg()})", rows, COLUMNS)
    common.write_json(args.output or common.default_output("grad-checkpointing", when), {
        "benchmark": "grad-checkpointing", "timestamp": when, "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine, "results": rows, "loadavg_at_end": common.loadavg()})
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
