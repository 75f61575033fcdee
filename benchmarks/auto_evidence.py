"""The evidence behind `auto`: `tuneforge compare` at several training-set sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/auto_evidence.py --sst2 ../shared/data/sst2 [--only text|image]
    .venv/bin/python benchmarks/auto_evidence.py --render      # the Markdown table of summary.json

Text: the packaged MiniLM-L6 (recipes/sst2-minilm.yaml) on the first 100 / 1,000 / 10,000
SST-2 training rows (5 / 1 / 1 epochs), validated on the first 500 dev sentences, max
length 64. Images: the packaged EfficientNet-Lite0 (recipes/digits-efficientnet.yaml) on
100 / 500 / all digits training images (3 / 1 / 1 epochs; round-robin over classes),
validated on the 360 held-out test digits. LoRA runs at its own learning rate on text
(1e-3, as recipes/sst2-minilm-lora.yaml); every other run uses its recipe's rates.
gradual-unfreeze (smallest sets only, for time) gets one stage per layer group.
The epochs are few because the shared 2-core machine was busy (load average 5-9):
OMP_NUM_THREADS=1 avoids thread oversubscription thrash there.

Each compare waits while /tmp/tuneforge-bench.lock exists (the shared machine's benchmark);
a re-run skips the sets already in summary.json. Results:
benchmarks/results/auto-evidence/<set>/compare.{csv,md} and summary.json.
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


def text_sets(sst2: Path, big: int) -> list[tuple[str, str, list[str], list[str]]]:
    # Validation: the first 500 dev sentences; max_length 64 covers SST-2 (few sentences are longer).
    base = [f"data.train={sst2 / 'train.tsv'}", f"data.validation={sst2 / 'dev.tsv'}", "data.max_eval_rows=500",
            "task.max_length=64", "train.eval_every=null"]
    out = []
    for rows, epochs in ((100, 5), (1000, 1), (big, 1)):
        common = base + [f"data.max_train_rows={rows}", f"train.epochs={epochs}",
                         f"strategy.epochs_per_stage={epochs / 8}"]  # 7 layer groups + the head-only stage
        # gradual-unfreeze only on the smallest set, for time (auto never chooses it)
        strategies = ["full", "linear-probe", "partial"] if rows < big else ["linear-probe", "full"]
        out.append((f"sst2-{rows}", "recipes/sst2-minilm.yaml", common,
                    strategies + (["gradual-unfreeze"] if rows == 100 else [])))
        out.append((f"sst2-{rows}-lora", "recipes/sst2-minilm.yaml", common + ["train.lr=1e-3"], ["lora"]))
        if rows == big:  # the largest set's slower runs last: a short session still has the ends of the range
            out.append((f"sst2-{rows}-partial", "recipes/sst2-minilm.yaml", common, ["partial"]))
    return out


def image_sets(digits: dict) -> list[tuple[str, str, list[str], list[str]]]:
    base = [f"data.train={digits['train']}", f"data.validation={digits['test']}", "data.test=null"]
    out = []
    for rows, epochs in ((100, 3), (500, 1), (None, 1)):
        label = rows or digits["n_train"]
        common = base + [f"train.epochs={epochs}", f"strategy.epochs_per_stage={epochs / 10}"]
        if rows:
            common.append(f"data.max_train_rows={rows}")
        out.append((f"digits-{label}", "recipes/digits-efficientnet.yaml", common,
                    ["full", "linear-probe", "partial", "lora"] + (["gradual-unfreeze"] if rows == 100 else [])))
    return out


def render(summary: dict) -> str:
    """The evidence tables (docs/auto-evidence.md) from summary.json: one row per (set, strategy)."""
    lines = ["| set | strategy | trainable params | val accuracy | val F1 (macro) | wall s | train samples/s "
             "| peak RSS MB | saved MB | trained weights MB | load before |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    mb = lambda b: "" if b in (None, "") else f"{b / 2**20:.1f}"  # noqa: E731
    for name, data in summary["sets"].items():
        for r in data["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['strategy']} | failed: {r['error'][:80]} |||||||||")
                continue
            lines.append(f"| {name.removesuffix('-lora').removesuffix('-partial')} | {r['strategy']} | {r.get('trainable_params', 0):,} "
                         f"| {r.get('accuracy', '')} | {r.get('f1_macro', '')} | {r.get('wall_s', '')} "
                         f"| {r.get('samples_per_s', '')} | {r.get('peak_rss_mb', '')} | {mb(r.get('saved_bytes'))} "
                         f"| {mb(r.get('delta_bytes'))} | {data['load_before']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sst2", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--only", choices=("text", "image"))
    p.add_argument("--big", type=int, default=10000, help="rows of the largest SST-2 set")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "auto-evidence"))
    p.add_argument("--render", action="store_true", help="print the Markdown table of an existing summary.json")
    args = p.parse_args()
    if args.render:
        print(render(json.loads((Path(args.out) / "summary.json").read_text())), end="")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from tuneforge.workflows.compare import compare
    from tuneforge.data.digits import materialise_digits

    text = text_sets(Path(args.sst2).resolve(), args.big) if args.only in (None, "text") else []
    cache = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))
    image = image_sets(materialise_digits(cache / "digits")) if args.only in (None, "image") else []
    # small sets of both kinds first, so a shortened session still covers every size it reaches
    sets = text[:2] + image[:1] + text[2:4] + image[1:2] + text[4:5] + text[5:] + image[2:]
    out = Path(args.out)
    summary = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "sets": {}}
    if (out / "summary.json").exists():  # a re-run continues: sets already measured are kept and skipped
        summary = json.loads((out / "summary.json").read_text())
        sets = [x for x in sets if x[0] not in summary["sets"]]
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
