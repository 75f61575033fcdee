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
