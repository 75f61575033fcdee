"""The training loop, read top to bottom.

It owns only the loop: micro-batches and accumulation, mixed precision,
clipping, the optimizer and schedule step, evaluation, and the events that
callbacks hook into. Everything else (what the model is, which parameters
train, what the loss is, logging, checkpoints, early stopping) comes in from
outside.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    step: int = 0                    # optimizer steps taken
    epoch: int = 0                   # completed passes over the training data
    epoch_float: float = 0.0         # fractional progress, for logs
    examples: int = 0                # training examples seen
    best_metric: float | None = None
    best_step: int | None = None
    last_improved: bool = False
    last_train_loss: float | None = None
    should_stop: bool = False
    stop_reason: str = ""
    evals: list = field(default_factory=list)


class Trainer:
    def __init__(self, *, model, task, strategy, optimizer, scheduler, train_loader, val_loader,
                 cfg, device: torch.device, amp_dtype: torch.dtype | None, metrics_factory, callbacks=()):
        self.model, self.task, self.strategy = model, task, strategy
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.cfg, self.device, self.amp_dtype = cfg, device, amp_dtype
        self.metrics_factory = metrics_factory
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self._loss_sum = torch.zeros((), device=device)  # summed on-device: no per-step host sync
        self._loss_count = 0

    # -- helpers ---------------------------------------------------------------------------
    def fire(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def current_lrs(self) -> dict:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def pop_train_loss(self) -> float | None:
        if not self._loss_count:
            return None
        value = float(self._loss_sum) / self._loss_count
        self._loss_sum.zero_()
        self._loss_count = 0
        return value

    def track(self, iterable, total: int, description: str):
        """Wrapped by a progress callback when one is present."""
        for cb in self.callbacks:
            if hasattr(cb, "track"):
                return cb.track(iterable, total, description)
        return iterable

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> TrainState:
        s, cfg = self.state, self.cfg
        eval_at_epoch_end = cfg.eval_every is None
        self.fire("on_fit_start")
        while s.step < self.total_steps and not s.should_stop:
            sampler = getattr(self.train_loader, "batch_sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(s.epoch)  # each epoch's order depends only on (seed, epoch)
            self.strategy.set_train_mode(self.model)
            self.fire("on_epoch_start")
            n_micro = len(self.train_loader)
            for i, batch in enumerate(self.train_loader):
                batch = self.to_device(batch)
                with self.autocast():
                    out = self.task.forward(self.model, batch)  # {"loss": (), "logits": (B, C)}
                # Average over the accumulated micro-batches; the last group of an
                # epoch may be shorter than grad_accum.
                group = min(cfg.grad_accum, n_micro - (i // cfg.grad_accum) * cfg.grad_accum)
                self.scaler.scale(out["loss"] / group).backward()
                self._loss_sum += out["loss"].detach()
                self._loss_count += 1
                s.examples += len(batch["labels"])
                if (i + 1) % cfg.grad_accum and i + 1 != n_micro:
                    continue  # still accumulating
                if cfg.max_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                s.step += 1
                s.epoch_float = s.epoch + (i + 1) / n_micro
                self.fire("on_step_end")
                if cfg.eval_every and s.step % cfg.eval_every == 0:
                    self.run_eval()
                if s.step >= self.total_steps or s.should_stop:
                    break
            else:
                s.epoch += 1
            if eval_at_epoch_end and not s.should_stop:
                self.run_eval()
            self.fire("on_epoch_end")
        if s.evals and s.evals[-1]["step"] != s.step and not s.should_stop:
            self.run_eval()  # always judge the final weights too
        self.fire("on_fit_end")
        return s

    def run_eval(self) -> dict:
        metrics = self.evaluate(self.val_loader, "validation")
        metrics["step"] = self.state.step
        self.state.evals.append(metrics)
        self.fire("on_eval_end", metrics)
        self.strategy.set_train_mode(self.model)
        return metrics

    def evaluate(self, loader, description: str = "eval") -> dict:
        return evaluate_loader(self.model, self.task, loader, self.metrics_factory(), self.device,
                               self.autocast, lambda it: self.track(it, len(loader), description))


@torch.inference_mode()
def evaluate_loader(model, task, loader, metrics, device, autocast=contextlib.nullcontext, track=iter) -> dict:
    """Stream a loader through the model, updating metrics batch by batch."""
    model.eval()
    t0 = time.perf_counter()
    for batch in track(loader):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast():
            out = task.forward(model, batch)  # {"loss": (), "logits": (B, C)}
        metrics.update(out["logits"], batch["labels"], out["loss"])
    result = metrics.compute()
    result["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return result
