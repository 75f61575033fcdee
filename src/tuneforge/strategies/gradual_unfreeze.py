"""`gradual-unfreeze`: ULMFiT's schedule (Howard & Ruder 2018, §3.2 "gradual unfreezing").

Stage 0 trains the head alone; each later stage unfreezes the next layer group(s)
from the top (ModelInfo layer groups), until every group trains. A stage lasts
`epochs_per_stage` epochs or `steps_per_stage` optimizer steps, and may start
with its own short learning-rate warmup (the newly unfrozen weights meet a
high rate gently).

Exact resume: the stage is a pure function of the optimizer step, and so is the
learning-rate multiplier. The optimizer holds every parameter that will ever
train from the first step (frozen ones have no gradient, so AdamW skips them and
they stay bit-identical until their stage), so its state, the schedule and the
checkpoint contents never depend on when the process started.
"""

from __future__ import annotations

import math
from typing import Optional

from pydantic import Field, model_validator
from torch import nn

from ..engine.callbacks import SCHEDULE, Callback
from ..engine.plan import TrainPlan
from ..errors import TuneforgeError
from .options import NAME_DOC, StrategyOptions
from .base import FreezingStrategy, backbone_groups, params_of, register


class GradualUnfreezeOptions(StrategyOptions):
    """ULMFiT-style: train the head first, then unfreeze one layer group at a time from the top, every `epochs_per_stage` epochs (or `steps_per_stage` steps), optionally re-warming the learning rate each stage. Newly unfrozen groups leave eval mode; the log says when each group unfreezes."""

    name: str = Field("gradual-unfreeze", description=NAME_DOC)
    epochs_per_stage: Optional[float] = Field(None, gt=0, description="Length of each stage in epochs (fractions allowed); default 1 when steps_per_stage is not set.")
    steps_per_stage: Optional[int] = Field(None, ge=1, description="Length of each stage in optimizer steps (instead of epochs_per_stage).")
    groups_per_stage: int = Field(1, ge=1, description="Layer groups unfrozen at each stage boundary.")
    layers: Optional[int] = Field(None, ge=1, description="Unfreeze at most this many top layer groups (the rest stay frozen); default: all, as in ULMFiT.")
    stage_warmup: float = Field(0.0, ge=0, description="Learning-rate re-warmup at the start of each stage after the first: a fraction of the stage if < 1, else steps; 0 keeps the global schedule.")

    @model_validator(mode="after")
    def _one_length(self) -> "GradualUnfreezeOptions":
        if self.epochs_per_stage is not None and self.steps_per_stage is not None:
            raise ValueError("strategy.epochs_per_stage and strategy.steps_per_stage both set the stage length; keep one")
        return self


@register("gradual-unfreeze", GradualUnfreezeOptions)
class GradualUnfreeze(FreezingStrategy):
    needs_task_head = True  # stage 0 trains the head alone

    def apply(self, model: nn.Module, info) -> nn.Module:
        groups = backbone_groups(info)
        k = self.options.layers or len(groups)
        if k > len(groups):
            raise TuneforgeError(f"strategy.layers is {k} but this model has {len(groups)} layer groups; "
                                 f"set strategy.layers between 1 and {len(groups)} (or leave it out to unfreeze all)")
        self.order = list(reversed(groups))[:k]  # top group first
        self.groups = groups
        self.n_stages = math.ceil(len(self.order) / self.options.groups_per_stage)
        self.stage = 0
        model = super().apply(model, info)  # frozen_groups: everything; stage 0 trains the head alone
        self.adapted = ["task_head"] + [n for g in self.order for n in g]
        return model

    def frozen_groups(self, groups):
        return list(groups)

    def will_train(self, model: nn.Module) -> set[str]:
        wanted = {id(p) for p in params_of(model, [n for g in self.order for n in g])}
        return {n for n, p in model.named_parameters() if p.requires_grad or id(p) in wanted}

    # -- the schedule: pure functions of the optimizer step -----------------------------------
    def stage_length(self, steps_per_epoch: int) -> int:
        if self.options.steps_per_stage:
            return self.options.steps_per_stage
        return max(1, round((self.options.epochs_per_stage or 1.0) * steps_per_epoch))

    def stage_at(self, step: int, length: int) -> int:
        return min(step // length, self.n_stages)

    def unfrozen_at(self, stage: int) -> list[list[str]]:
        return self.order[: stage * self.options.groups_per_stage]

    def set_stage(self, model: nn.Module, stage: int) -> list[list[str]]:
        """Unfreeze the groups of every stage up to ``stage``; returns the groups newly unfrozen."""
        new = [g for g in self.unfrozen_at(stage) if g not in self.unfrozen_at(self.stage)]
        for group in new:
            for p in params_of(model, group):
                p.requires_grad_(True)
        self.stage = stage
        thawed = {n for g in self.unfrozen_at(stage) for n in g}
        self.frozen = [n for g in self.groups for n in g if n not in thawed]
        return new

    def wrap_schedule(self, fn, plan: TrainPlan):
        length = self.stage_length(plan.steps_per_epoch)
        w = self.options.stage_warmup
        warm = int(round(w * length)) if w < 1 else int(w)
        if warm <= 0:
            return fn

        def rewarmed(step: int) -> float:
            stage, into = step // length, step % length
            if 1 <= stage <= self.n_stages and into < warm:
                return fn(step) * (into + 1) / warm
            return fn(step)

        return rewarmed

    def callbacks(self, plan: TrainPlan, log) -> list[Callback]:
        return [UnfreezeSchedule(self, self.stage_length(plan.steps_per_epoch), plan.total_steps, log)]


def _short(group: list[str]) -> str:
    names = [n.removeprefix("backbone.") for n in group]
    return names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "")


class UnfreezeSchedule(Callback):
    """Applies the stage of the current step: at fit start (a resumed run restores its stage)
    and after every optimizer step; logs each unfreeze and records it (``trainer.record``:
    an ``unfreeze`` line in metrics.jsonl)."""

    order = SCHEDULE  # an unfreeze happens before the step's checkpoint records the state

    def __init__(self, strategy: GradualUnfreeze, length: int, total_steps: int, log):
        self.strategy, self.length, self.total_steps, self.log = strategy, length, total_steps, log

    def on_fit_start(self, trainer) -> None:
        st, step = self.strategy, trainer.state.step
        plan = "; ".join(f"step {k * self.length}: {', '.join(_short(g) for g in st.unfrozen_at(k)[len(st.unfrozen_at(k - 1)):])}"
                         for k in range(1, st.n_stages + 1))
        self.log(f"gradual-unfreeze: head only for {self.length} steps, then {plan}")
        last = st.n_stages * self.length
        if last >= self.total_steps:
            left = sum(1 for k in range(1, st.n_stages + 1) if k * self.length >= self.total_steps)
            self.log(f"[yellow]gradual-unfreeze: training ends at step {self.total_steps}, before the last {left} "
                     f"stage(s) begin[/] (raise train.epochs or shorten strategy.epochs_per_stage/steps_per_stage)")
        stage = st.stage_at(step, self.length)
        if stage:
            st.set_stage(trainer.model, stage)
            self.log(f"gradual-unfreeze: resumed at step {step} in stage {stage} "
                     f"({len(st.unfrozen_at(stage))} group(s) unfrozen)")

    def on_step_end(self, trainer) -> None:
        st, s = self.strategy, trainer.state
        stage = st.stage_at(s.step, self.length)
        if stage <= st.stage:
            return
        new = st.set_stage(trainer.model, stage)
        st.set_train_mode(trainer.model)  # newly unfrozen groups leave eval mode
        self.log(f"gradual-unfreeze: step {s.step} (epoch {s.epoch_float:.2f}): stage {stage}, unfreezing "
                 + ", ".join(_short(g) for g in new))
        trainer.record({"event": "unfreeze", "step": s.step, "epoch": round(s.epoch_float, 4), "stage": stage,
                        "groups": [[n.removeprefix("backbone.") for n in g] for g in new]})
