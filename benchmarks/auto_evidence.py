"""The evidence behind `auto`: `tuneforge compare` at several training-set sizes.

    .venv/bin/python benchmarks/auto_evidence.py --sst2 ../shared/data/sst2 [--only text|image]

Text: the packaged MiniLM-L6 (recipes/sst2-minilm.yaml) on the first 100 / 1,000 / 10,000
SST-2 training rows, validated on the whole dev set (872 rows). Images: the packaged
EfficientNet-Lite0 (recipes/digits-efficientnet.yaml) on 100 / 500 / all digits training
images (round-robin over classes), validated on the 360 held-out test digits.
Small sets run more epochs so every strategy gets a comparable number of steps. LoRA runs
at its own learning rate (1e-3, as recipes/sst2-minilm-lora.yaml); the others at the
recipe's. gradual-unfreeze gets one stage per layer group across the run.

Each compare waits while /tmp/tuneforge-bench.lock exists (the shared machine's benchmark).
Results: benchmarks/results/auto-evidence/<set>/compare.{csv,md} and a summary JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LOCK = Path("/tmp/tuneforge-bench.lock")


def wait_for_lock() -> None:
    while LOCK.exists():
        print("  waiting: the benchmark lock is held", flush=True)
        time.sleep(20)


def text_sets(sst2: Path) -> list[tuple[str, str, list[str], list[str]]]:
    base = [f"data.train={sst2 / 'train.tsv'}", f"data.validation={sst2 / 'dev.tsv'}"]
    out = []
    for rows, epochs in ((100, 8), (1000, 2), (10000, 1)):
        common = base + [f"data.max_train_rows={rows}", f"train.epochs={epochs}",
                         "train.eval_every=null", f"strategy.epochs_per_stage={epochs / 8}"]  # 7 groups + head stage
        # gradual-unfreeze is left out at 10,000 rows for time (auto never chooses it)
        out.append((f"sst2-{rows}", "recipes/sst2-minilm.yaml", common,
                    ["full", "partial", "linear-probe"] + (["gradual-unfreeze"] if rows < 10000 else [])))
        out.append((f"sst2-{rows}-lora", "recipes/sst2-minilm.yaml", common + ["train.lr=1e-3"], ["lora"]))
    return out


def image_sets(digits: dict) -> list[tuple[str, str, list[str], list[str]]]:
    base = [f"data.train={digits['train']}", f"data.validation={digits['test']}", "data.test=null"]
    out = []
    for rows, epochs in ((100, 5), (500, 2), (None, 1)):
        label = rows or digits["n_train"]
        common = base + [f"train.epochs={epochs}", f"strategy.epochs_per_stage={epochs / 10}"]
        if rows:
            common.append(f"data.max_train_rows={rows}")
        out.append((f"digits-{label}", "recipes/digits-efficientnet.yaml", common,
                    ["full", "partial", "linear-probe", "lora"] + (["gradual-unfreeze"] if rows else [])))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sst2", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--only", choices=("text", "image"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "auto-evidence"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from tuneforge.compare import compare
    from tuneforge.data.digits import materialise_digits

    text = text_sets(Path(args.sst2).resolve()) if args.only in (None, "text") else []
    cache = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))
    image = image_sets(materialise_digits(cache / "digits")) if args.only in (None, "image") else []
    # small sets of both kinds first, so a shortened session still covers every size it reaches
    sets = text[:2] + image[:1] + text[2:4] + image[1:2] + text[4:] + image[2:]
    out = Path(args.out)
    summary = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "sets": {}}
    console = Console(stderr=True)
    for name, recipe, overrides, strategies in sets:
        wait_for_lock()
        load = os.getloadavg()[0]
        console.print(f"[bold]{name}[/]: {', '.join(strategies)} (load average {load:.1f})")
        result = compare(ROOT / recipe, strategies, overrides=overrides, output=out / name, console=console)
        summary["sets"][name] = {"recipe": recipe, "overrides": overrides, "load_before": round(load, 2),
                                 "rows": result.rows}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        console.print(result.table())
        for row in result.rows:  # the table has what it needs; weights would fill the disk
            for part in ("checkpoints", "model"):
                shutil.rmtree(Path(row["run_dir"]) / part, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
