"""`tuneforge compare`: one recipe under several strategies, one table.

Each strategy runs as its own ``tuneforge train`` process (by default) in its own
run directory under one compare directory, so its peak memory and wall time are
its own and a crash is a row with its error, not the end of the comparison. The
table (trainable parameters, peak memory, wall time, samples/s, validation
metrics, bytes that must be saved) is printed and written as ``compare.csv`` and
``compare.md``.

Strategy options that the recipe sets and another strategy does not take (e.g.
``rank`` when comparing lora with full) are dropped for that strategy; the
per-strategy recipe actually run is written next to its run directory.
"""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from ..errors import TuneforgeError

COLUMNS = ("strategy", "status", "trainable_params", "total_params", "trainable_pct", "peak_rss_mb", "peak_gpu_mb",
           "wall_s", "train_s", "samples_per_s", "accuracy", "f1", "f1_macro", "token_accuracy", "loss", "saved_bytes",
           "delta_bytes",
           "run_dir", "error")


@dataclass
class Comparison:
    path: Path
    rows: list[dict] = field(default_factory=list)

    def table(self) -> str:
        return markdown_table(self.rows)


def _recipe_dict(recipe, overrides) -> dict:
    from ..recipe import Recipe, apply_overrides

    if isinstance(recipe, Recipe):
        data = recipe.dump()
    elif isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
    else:
        from ..yaml_safe import read_recipe_file

        data = read_recipe_file(Path(recipe))  # the recipe loader's own checks: duplicate keys, aliases
    return apply_overrides(data, list(overrides or []))


def strategy_recipe(data: dict, name: str, out: Path) -> dict:
    """``data`` under strategy ``name``: its strategy options kept where that strategy takes them."""
    from ..strategies import options_class

    fields = options_class(name).model_fields
    given = data.get("strategy") or {}
    recipe = copy.deepcopy(data)
    recipe["strategy"] = {"name": name, **{k: v for k, v in given.items() if k in fields and k != "name"}}
    recipe.setdefault("output", {})
    recipe["output"] = {**(recipe["output"] or {}), "dir": str(out), "overwrite": True}
    recipe.setdefault("train", {})
    recipe["train"] = {**(recipe["train"] or {}), "progress": False}
    return recipe


def _dir_bytes(path: Path) -> int | None:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None


def read_row(name: str, run: Path, wall_s: float, error: str | None) -> dict:
    """One table row from a finished (or failed) run directory."""
    row: dict = {"strategy": name, "status": "failed" if error else "ok", "run_dir": str(run), "error": error or "",
                 "wall_s": round(wall_s, 1)}
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    params = manifest.get("parameters", {})
    if params:
        row["trainable_params"], row["total_params"] = params["trainable"], params["total"]
        row["trainable_pct"] = round(100 * params["trainable"] / max(params["total"], 1), 3)
    timings = manifest.get("timings", {})
    for key in ("peak_rss_mb", "peak_gpu_mb", "samples_per_s"):
        if key in timings:
            row[key] = timings[key]
    if "train_s" in timings:
        row["train_s"] = timings["train_s"]
    if "strategy_decision" in manifest:
        row["strategy"] = f"{name} -> {manifest['strategy_decision']['chosen']}"
    try:
        final = json.loads((run / "eval.json").read_text())["validation"]
        for key in ("accuracy", "f1", "f1_macro", "token_accuracy", "loss"):  # those the task reports
            if isinstance(final.get(key), (int, float)):
                row[key] = round(final[key], 4)
    except (OSError, ValueError, KeyError):
        pass
    row["saved_bytes"] = _dir_bytes(run / "model")
    best = run / "checkpoints" / "best" / "trainable.safetensors"
    row["delta_bytes"] = best.stat().st_size if best.is_file() else None
    return row


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line.removeprefix("error: ").strip()[:500]
    return (lines[-1] if lines else "exited without output")[:500]


def _run_isolated(recipe: dict, name: str, root: Path) -> tuple[float, str | None]:
    path = root / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log = root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(path)], stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    return wall, (None if proc.returncode == 0 else _last_error(log.read_text(encoding="utf-8", errors="replace")))


def _run_in_process(recipe: dict, name: str, root: Path) -> tuple[float, str | None]:
    from rich.console import Console

    from ..run.finetune import finetune

    log = root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            finetune(recipe, console=Console(file=f, width=200))
            error = None
        except Exception as err:  # a failed strategy is a row, not the end of the comparison
            error = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    return time.perf_counter() - t0, error


def compare(recipe, strategies: list[str] | str, *, overrides: list[str] | None = None, output: str | Path | None = None,
            isolate: bool = True, console=None) -> Comparison:
    """Run ``recipe`` under each strategy in turn; returns the rows and writes compare.csv / compare.md.

    ``isolate``: each run in its own process (its own peak memory; a crash stays a row). In-process
    runs are faster to start but share one process, so peak memory is left out of their rows.
    """
    from ..strategies import options_class

    names = [s.strip() for s in (strategies.split(",") if isinstance(strategies, str) else strategies) if s.strip()]
    if not names:
        raise TuneforgeError("--strategies is empty; list strategies separated by commas, e.g. full,lora,linear-probe")
    for name in names:
        options_class(name)  # unknown names fail here, before anything runs, with a did-you-mean
    if len(set(names)) != len(names):
        raise TuneforgeError(f"--strategies lists a strategy twice ({', '.join(names)}); list each once")
    data = _recipe_dict(recipe, overrides)
    stem = Path(recipe).stem if isinstance(recipe, (str, Path)) else "recipe"
    root = Path(output) if output else Path("runs") / f"compare-{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    root.mkdir(parents=True, exist_ok=True)
    say = (console.print if console is not None else (lambda *a, **k: None))
    result = Comparison(root)
    for i, name in enumerate(names, 1):
        run = root / name
        say(f"compare [{i}/{len(names)}]: {name} -> {run}", highlight=False)
        runner = _run_isolated if isolate else _run_in_process
        wall, error = runner(strategy_recipe(data, name, run), name, root)
        row = read_row(name, run, wall, error)
        if not isolate:
            row.pop("peak_rss_mb", None)  # one process for all runs: its peak is not this strategy's
        result.rows.append(row)
        say(f"  {row['status']} in {wall:.1f}s" + (f": {error}" if error else
                                                    (f", accuracy {row['accuracy']}" if "accuracy" in row else
                                                     f", f1 {row.get('f1', 'n/a')}")), highlight=False)
        write_tables(result)
    return result


def _fmt(key: str, value) -> str:
    if value is None or value == "":
        return ""
    if key in ("trainable_params", "total_params", "saved_bytes", "delta_bytes") and isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if c != "run_dir" and any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(result: Comparison) -> None:
    with open(result.path / "compare.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k, "")) for k in COLUMNS})
    (result.path / "compare.md").write_text(markdown_table(result.rows), encoding="utf-8")


def print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    cols = [c for c in COLUMNS if c not in ("run_dir",) and any(r.get(c) not in (None, "") for r in rows)]
    table = Table(title="tuneforge compare")
    for c in cols:
        table.add_column(c, justify="left" if c in ("strategy", "status", "error") else "right",
                         overflow="fold")
    for r in rows:
        table.add_row(*[_fmt(c, r.get(c)) for c in cols])
    console.print(table)
