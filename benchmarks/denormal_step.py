"""Bare training step of EfficientNet-Lite0 on real digit images, with and without flushing denormals.

    .venv/bin/python benchmarks/denormal_step.py                 # 30 timed steps per mode
    .venv/bin/python benchmarks/denormal_step.py --steps 60 --rounds 6

The training step is the engine's: tuneforge reads the scikit-learn digits (64 px, the
image benchmark's data), builds the model, transforms and batches as a run does (random
crops on, as in benchmarks/image.py), and one step is forward + backward under the
precision ``train.precision: auto`` picks (bf16 autocast on a CPU with AVX-512 BF16),
gradient clipping and a fused AdamW update. No data loading is timed: 8 real batches are
decoded first and cycled through.

Modes, interleaved in rounds so that a shared machine's load falls on each alike; every
block starts from the same weights and optimizer state and runs ``--warmup`` untimed steps:

* ``off``          nothing flushed;
* ``this-thread``  ``torch.set_flush_denormal(True)`` once torch's intra-op threads exist:
                   only the calling thread flushes (what a plain call gives inside a run);
* ``all-threads``  ``tuneforge.engine.denormals.set_flush_denormal(True)``: every
                   intra-op thread flushes (what ``train.flush_denormal`` does).

Prints the median and mean seconds per step of each mode and writes a JSON file
(``benchmarks/results/denormal-step-<timestamp>.json`` or ``--output``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = ("off", "this-thread", "all-threads")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode, split over the rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every block")
    p.add_argument("--precision", default="auto")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tuneforge.data.digits import materialise_digits
    from tuneforge.engine import denormals
    from tuneforge.engine.optim import build_optimizer
    from tuneforge.engine.precision import precision_name, resolve_precision
    from tuneforge.models import load_model
    from tuneforge.recipe import load_recipe
    from tuneforge.tasks import get_task

    digits = materialise_digits(common.RESULTS_DIR / "data" / f"digits-{args.image_size}", size=args.image_size)
    recipe = load_recipe({"model": {"name": args.model},
                          "task": {"type": "image-classification", "image_size": args.image_size},
                          "data": {"train": digits["train"], "augment": True, "num_workers": 0},
                          "train": {"batch_size": args.batch_size, "precision": args.precision}})
    torch.manual_seed(0)
    task = get_task(recipe)
    records = task.read("train", digits["train"], limit=None, skipped=[])
    labels = task.label_map(records)
    loaded = load_model(args.model)
    task.attach(loaded)
    model = task.build_model(loaded, labels)
    loader = task.loader(task.dataset(records, labels, "train"), args.batch_size, train=True, seed=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 8:
            break
    device = torch.device("cpu")
    amp = resolve_precision(args.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "lr": 1e-3, "weight_decay": 0.01, "name": "all"}], device)
    model.train()

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
            out = task.forward(model, batch)
            loss = out["loss_sum"] / out["count"]  # the mean, as a one-micro-batch training step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # optimizer state exists from here; every block starts from this snapshot
    start = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def set_mode(mode: str) -> None:
        denormals.set_flush_denormal(False)  # every thread off
        if mode == "this-thread":
            torch.set_flush_denormal(True)
        elif mode == "all-threads":
            denormals.set_flush_denormal(True)

    modes = common.split_list(args.modes)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode '{m}'; use {', '.join(MODES)}")
    per_block = max(1, args.steps // args.rounds)
    times = {m: [] for m in modes}
    machine = common.machine_info()
    load_before = os.getloadavg()
    out = args.output or common.RESULTS_DIR / f"denormal-step-{common.stamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(summary=None) -> None:  # after every block too: a run cut short keeps what it measured
        out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                   "threads": torch.get_num_threads(), "precision": precision_name(amp),
                                   "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                                   "summary": summary, "times": times}, indent=2))

    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            model.load_state_dict(start[0])
            optimizer.load_state_dict(start[1])
            set_mode(mode)
            for i in range(args.warmup):
                step(i)
            for i in range(per_block):
                t0 = time.perf_counter()
                step(args.warmup + i)
                times[mode].append(time.perf_counter() - t0)
            write()
    set_mode("off")
    load_after = os.getloadavg()

    summary = {m: {"median_s": statistics.median(t), "mean_s": statistics.fmean(t), "min_s": min(t), "steps": len(t)}
               for m, t in times.items()}
    base = summary[modes[0]]["median_s"]
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, {precision_name(amp)}, "
          f"{torch.get_num_threads()} threads; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for mode, s in summary.items():
        print(f"  {mode:12s} median {s['median_s']:.3f} s/step  mean {s['mean_s']:.3f}  min {s['min_s']:.3f}  "
              f"({s['steps']} steps)  {base / s['median_s']:.2f}x {modes[0]}")
    write(summary)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
