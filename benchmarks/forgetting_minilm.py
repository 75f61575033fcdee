"""Forgetting, measured: MiniLM-L6 fine-tuned on task A (SST-2 sentiment), then on task B,
with `full` and with `lora`; A's head scores A's dev set on the backbone after B.

    python benchmarks/forgetting_minilm.py [--rows 2000] [--out runs/forgetting]

Task B is derived from SST-2's own sentences because this machine holds no second text
data set: "long" (more than 7 words, the median) vs "short". It asks for other features than
sentiment, which is what makes the forgetting visible. Prints one table; the numbers
in docs/evaluation.md come from this script.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import tuneforge

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2"


def write_task_b(src: Path, dst: Path, rows: int) -> Path:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8", newline="") as out:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for i, row in enumerate(reader):
            if i >= rows:
                break
            writer.writerow([row["sentence"], "long" if len(row["sentence"].split()) > 7 else "short"])
    return dst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--retain-rows", type=int, default=872, help="A's dev sentences scored (872 = all)")
    p.add_argument("--out", default="runs/forgetting")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": {"name": "minilm-l6"}, "task": {"type": "text-classification", "max_length": 64}}
    train = {"epochs": 1, "batch_size": 32, "eval_every": 16, "progress": False}
    a = tuneforge.finetune({**common,
                            "data": {"train": str(SST2 / "train.tsv"), "validation": str(SST2 / "dev.tsv"),
                                     "text_column": "sentence", "columns": {"validation": {"text_column": "content"}},
                                     "max_train_rows": args.rows},
                            "train": {**train, "lr": 2e-4, "head_lr": 2e-3},
                            "output": {"dir": str(out / "A-sst2"), "overwrite": True}})
    b_train = write_task_b(SST2 / "train.tsv", out / "b_long_short.csv", 200_000)
    rows = []
    for strategy, lr in (("full", 2e-4), ("lora", 1e-3)):
        b = tuneforge.finetune({**common,
                                "data": {"train": str(b_train), "max_train_rows": args.rows, "validation_split": 0.1},
                                "strategy": {"name": strategy}, "train": {**train, "lr": lr, "head_lr": 2e-3},
                                "retain": {"data": str(SST2 / "dev.tsv"), "text_column": "content",
                                           "label_column": "label", "head_from": str(a.path), "max_rows": args.retain_rows},
                                "output": {"dir": str(out / f"B-{strategy}"), "overwrite": True}},
                               init_from=str(a.path))
        f = b.metrics["forgetting"]
        last = f["history"][-1]
        rows.append({"strategy": strategy, "B_accuracy": b.metrics["validation"]["accuracy"],
                     "A_before": f["before"]["accuracy"], "A_after": last["retain_accuracy"],
                     "forgetting": last["retain_accuracy_drop"], "cka": last["retain_cka"],
                     "cosine": last["retain_cosine"]})
    print(f"A (SST-2, {args.rows} rows, full): dev accuracy {a.metrics['validation']['accuracy']:.4f}")
    print("| B strategy | B accuracy | A acc. before B | A acc. after B | forgetting | CKA | mean cosine |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['strategy']} | {r['B_accuracy']:.4f} | {r['A_before']:.4f} | {r['A_after']:.4f} | "
              f"{r['forgetting']:+.4f} | {r['cka']:.4f} | {r['cosine']:.4f} |")
    (out / "forgetting.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
