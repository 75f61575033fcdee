"""Optimizer and learning-rate schedules."""

from __future__ import annotations

import math

import torch


def build_optimizer(param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    groups = [g for g in param_groups if g["params"]]
    # The fused AdamW kernel does the whole update in one pass per tensor list
    # (CPU and CUDA); fall back to foreach where a build lacks it.
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True)


def schedule_fn(kind: str, total_steps: int, warmup_steps: int):
    """lr multiplier for step s: linear warmup, then linear/cosine decay to 0 (or constant)."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


def build_scheduler(optimizer, kind: str, total_steps: int, warmup: float, wrap=None):
    """``wrap(fn) -> fn``: a strategy's reshaping of the multiplier (e.g. re-warmup per stage).
    The multiplier stays a pure function of the step, so a resumed run's schedule is exact."""
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    fn = schedule_fn(kind, total_steps, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, wrap(fn) if wrap else fn)


def schedule_curve(scheduler, total_steps: int, buckets: int = 100) -> dict:
    """The learning rate of every step, compressed for the report (``manifest.json``
    ``lr_schedule``): optimizer step k (from 1) uses ``base_lr * multiplier(k - 1)``. The steps
    fall into at most ``buckets`` runs; each keeps its first, last, lowest and highest points,
    so a warmup of a few steps among thousands still shows, and so does a strategy's re-warmup
    (the scheduler's own multiplier is read, wrapping included). Cheap: one call per step."""
    fn = scheduler.lr_lambdas[0]
    size = max(1, math.ceil(total_steps / buckets))
    keep: list[int] = []
    for start in range(0, total_steps, size):
        run = [(fn(s), s) for s in range(start, min(total_steps, start + size))]
        keep += sorted({run[0][1], run[-1][1], min(run)[1], max(run)[1]})
    names = [g.get("name", str(i)) for i, g in enumerate(scheduler.optimizer.param_groups)]
    return {"step": [s + 1 for s in keep], "multiplier": [float(f"{fn(s):.6g}") for s in keep],
            "base_lr": dict(zip(names, scheduler.base_lrs))}
