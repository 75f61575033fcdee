"""GRPO on real weights: SmolLM2-135M-Instruct + LoRA on two-digit addition, before and after.

    python benchmarks/grpo_smollm2.py [--model DIR] [--steps N] [--set key=value ...]

Writes the data (``tuneforge make-grpo-data``'s generator, seed 0: 400 training and 32 held-out
additions, no pair in both) under ``benchmarks/results/grpo-smollm2-<stamp>/``, runs
``recipes/grpo-smollm2-addition.yaml`` there with the plain ``tuneforge train`` CLI (one
process, ``nice -n 5``), and writes ``grpo-smollm2-<stamp>.json`` beside it: the held-out
reward before and after (greedy completions, the task's own baseline evaluation and the final
one), per reward, the training rewards per step, rollout / reference / update seconds, the wall
time, the CPU model and the load average before and after. Every figure is read from the run
directory; nothing is estimated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="SmolLM2 directory (or the alias)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], help="more recipe overrides")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from tuneforge.llm.verifiable import write_addition_data

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = BENCH / "results" / f"grpo-smollm2-{stamp}"
    data = write_addition_data(out / "data", n_train=400, n_validation=32, seed=0)
    overrides = [f"model.name={args.model}", f"data.train={data['train']}", f"data.validation={data['validation']}",
                 f"output.dir={out / 'run'}", "output.keep_resumable=true", *args.set]
    if args.steps:
        overrides += [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"]
    command = ["nice", "-n", "5", sys.executable, "-m", "tuneforge", "train",
               str(ROOT / "recipes" / "grpo-smollm2-addition.yaml")] + [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        rc = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    if rc:
        print(f"tuneforge train failed (exit {rc}); see {out / 'train.log'}")
        return rc
    run = out / "run"
    final = json.loads((run / "eval.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    grpo = final["generation"]
    rollouts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"event": "rollout"' in line]
    result = {
        "command": " ".join(command), "cpu": cpu_model(), "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "wall_s": round(wall, 1), "torch_threads": manifest.get("torch_threads") or manifest.get("threads"),
        "before": grpo["before_training"], "after": final["validation"], "timings": grpo["timings"],
        "run_timings": manifest.get("timings"), "train_rewards": [
            {k: r[k] for k in ("step", "reward", "reward_correct", "reward_format", "kl", "completion_tokens",
                               "rollout_s", "reference_s", "update_s") if k in r} for r in rollouts],
    }
    path = BENCH / "results" / f"grpo-smollm2-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    b, a = result["before"], result["after"]
    print(f"held-out ({a['prompts']} prompts, greedy): reward {b['reward']:.4f} -> {a['reward']:.4f}; "
          f"correct {b['reward_correct']:.4f} -> {a['reward_correct']:.4f}; format {b['reward_format']:.4f} -> "
          f"{a['reward_format']:.4f}; kl {a.get('kl')}")
    t = result["timings"]
    print(f"rollout {t['rollout_s']}s, reference {t['reference_s']}s, update {t['update_s']}s; wall {wall:.0f}s; "
          f"{result['cpu']}; load {result['load_before']} -> {result['load_after']}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
