"""How long training runs, known before the Trainer exists.

The schedule and a strategy's callbacks need the step counts when they are built, and
they are built before the Trainer (it takes them as constructor arguments), so the counts
are a small pure value of their own rather than attributes of a half-made Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Protocol


class TrainConfig(Protocol):
    """The settings the loop reads; ``recipe.TrainSection`` is one, a test may pass a dataclass."""

    epochs: float                   # passes over the training data (fractions allowed)
    max_steps: Optional[int]        # optimizer steps; overrides epochs when set
    grad_accum: int                 # micro-batches per optimizer step
    max_grad_norm: Optional[float]  # clip the global gradient norm; None: no clipping
    on_nonfinite: Literal["error", "skip"]  # a NaN/inf loss or gradient: raise, or skip the step
    eval_every: Optional[int]       # evaluate every N steps; None: once per epoch
    eval_before: Optional[bool]     # evaluate once before the first step (step 0); not when resuming
    log_every: int                  # materialise the training loss (one host sync) every N steps


@dataclass(frozen=True)
class TrainPlan:
    micro_per_epoch: int   # micro-batches in one pass over the training data
    steps_per_epoch: int   # optimizer steps per pass (the last group of an epoch may be short)
    total_steps: int       # optimizer steps of the whole run

    @classmethod
    def of(cls, train: int | object, cfg: TrainConfig) -> "TrainPlan":
        """``train``: the training loader (its length is its number of micro-batches) or that number."""
        micro = train if isinstance(train, int) else len(train)
        steps = math.ceil(micro / cfg.grad_accum)
        return cls(micro, steps, cfg.max_steps or max(1, math.ceil(cfg.epochs * steps)))
