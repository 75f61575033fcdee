"""The training loop, read top to bottom.

It owns only the loop: micro-batches and token-weighted accumulation, mixed precision,
clipping, the optimizer and schedule step, the running training loss, evaluation, and the
events that callbacks hook into (callbacks.py, which also says in what order they run).
Everything else (what the model is, which parameters train, what the loss is, logging,
checkpoints, early stopping, MFU, denormal flushing) comes in from outside.

The task's side of the contract (tasks/base.py): ``task.forward(model, batch)`` returns
``{"loss_sum": (), "count": () or int, "logits": ...}``, the loss summed over what it is
averaged over (target tokens, examples, pairs) and how many of those there were. The
step's gradient is the mean over every target of every accumulated micro-batch, however
unevenly they are spread (completion-only loss makes token counts vary a lot); a mean
of per-micro-batch means would weight a short reply's tokens more than a long one's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import TuneforgeError
from .plan import TrainConfig, TrainPlan
from .throughput import speed


@dataclass
class TrainState:
    step: int = 0                    # optimizer steps taken
    epoch: int = 0                   # completed passes over the training data
    micro: int = 0                   # micro-batches consumed in the current epoch (data position)
    epoch_float: float = 0.0         # fractional progress, for logs
    examples: int = 0                # training examples seen
    tokens: int = 0                  # real (non-padding) tokens seen, text only
    positions: int = 0               # token positions computed, padding included
    # Written by BestCheckpoint in on_eval_end (its declared output): an evaluation improved
    # on the best so far exactly when best_step == step (see improved()).
    best_metric: float | None = None
    best_step: int | None = None
    should_stop: bool = False
    stop_reason: str = ""
    interrupted: bool = False        # stopped by SIGINT/SIGTERM: the caller saves and exits
    skipped_nonfinite: list = field(default_factory=list)  # steps skipped for NaN/inf (on_nonfinite: skip)
    last_checkpoint_step: int | None = None
    evals: list = field(default_factory=list)

    # Fields a resumed run restores (the rest describe this process only).
    RESUMED = ("step", "epoch", "micro", "epoch_float", "examples", "tokens", "positions", "best_metric", "best_step",
               "skipped_nonfinite", "evals")

    def improved(self) -> bool:
        """Whether this step's evaluation is the best so far; for callbacks ordered after BEST."""
        return self.best_step is not None and self.best_step == self.step


class Trainer:
    def __init__(self, *, model, task, optimizer, train_loader, val_loader, cfg: TrainConfig, device: torch.device,
                 amp_dtype: torch.dtype | None, metrics_factory, scheduler=None, callbacks=(),
                 plan: TrainPlan | None = None, train_mode: Callable | None = None,
                 prepare_batch: Callable[[dict], dict] | None = None):
        """``task``: anything with ``forward(model, batch)`` (above). ``scheduler``: stepped after
        every optimizer step (None: constant rates). ``train_mode(model)``: puts the model in
        training mode (a strategy keeps frozen parts in eval mode); default ``model.train()``.
        ``prepare_batch``: applied to each training batch once it is on the device (channels-last
        images; evaluation batches are left as they come, as they always were)."""
        self.model, self.task = model, task
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.cfg, self.device, self.amp_dtype = cfg, device, amp_dtype
        self.metrics_factory = metrics_factory
        self.plan = plan or TrainPlan.of(train_loader, cfg)
        self.train_mode = train_mode or (lambda m: m.train())
        self.prepare_batch = prepare_batch
        # Checkpoints hold what the optimizer holds: every parameter that trains at any point.
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.optimized_names = {n for n, p in model.named_parameters() if id(p) in held}
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)  # stable: equal orders keep list order
        self.state = TrainState()
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        # The training loss since the last log line, summed on-device: no per-step host sync.
        self._loss_sum = torch.zeros((), device=device)
        self._loss_count = torch.zeros((), dtype=torch.long, device=device)
        self._mark = (time.perf_counter(), 0, 0, 0)  # time, examples, tokens, positions at the last log
        self._step_lrs: dict | None = None  # the learning rates the last optimizer step used

    # -- helpers ---------------------------------------------------------------------------
    def fire(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def record(self, event: dict) -> None:
        """An event for the run's record (e.g. a strategy's unfreeze); MetricsLog writes it."""
        self.fire("on_record", event)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return self.prepare_batch(out) if self.prepare_batch else out

    def current_lrs(self) -> dict:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def eval_due(self) -> bool:
        return bool(self.cfg.eval_every) and self.state.step % self.cfg.eval_every == 0

    def track(self, iterable, total: int, description: str):
        for cb in self.callbacks:  # a progress callback wraps it; the others hand it back
            iterable = cb.track(iterable, total, description)
        return iterable

    def save_resumable(self) -> None:
        """A resumable checkpoint now (the run was interrupted between checkpoints)."""
        self.fire("on_checkpoint_request")

    def checkpoint_meta(self) -> dict:
        """Everything besides tensors that an exact resume needs."""
        s = self.state
        return {
            "step": s.step, "epoch": s.epoch_float,
            "trainer": {k: getattr(s, k) for k in TrainState.RESUMED},
            "pending_loss_sum": [float(self._loss_sum), int(self._loss_count)],
            # keyed by class name: checkpoints written by earlier versions load the same way
            "callbacks": {type(cb).__name__: st for cb in self.callbacks if (st := cb.state_dict()) is not None},
        }

    def restore(self, meta: dict) -> None:
        for k, v in meta["trainer"].items():
            setattr(self.state, k, v)
        # A checkpoint from before token weighting holds a sum of micro-batch means
        # ("pending_loss"), which does not mix with sums over targets: its first log line
        # after resuming averages the steps after the checkpoint only.
        loss_sum, count = meta.get("pending_loss_sum", (0.0, 0))
        self._loss_sum.fill_(loss_sum)
        self._loss_count.fill_(count)
        states = meta["callbacks"]
        for cb in self.callbacks:
            if type(cb).__name__ in states:
                cb.load_state_dict(states[type(cb).__name__])
        self.state.last_checkpoint_step = self.state.step

    def nonfinite(self, step_indices: list, loss_finite: bool) -> bool:
        """Handle a NaN/inf loss or gradient; True means skip this step."""
        where = self.task_where(step_indices)
        if self.cfg.on_nonfinite == "skip":
            self.state.skipped_nonfinite.append({"step": self.state.step + 1, "records": where[:8]})
            return True
        what = "loss" if not loss_finite else "gradient norm"
        last = self.state.last_checkpoint_step
        raise TuneforgeError(
            f"non-finite {what} at step {self.state.step + 1} (batch records: {', '.join(where[:8])}"
            f"{' ...' if len(where) > 8 else ''}); lower train.lr, use train.precision: fp32, check those records, "
            f"or set train.on_nonfinite: skip. "
            + (f"The last good checkpoint is step {last}; resume with --resume." if last else "No step was saved."))

    def task_where(self, step_indices: list) -> list[str]:
        where = getattr(self.train_loader.dataset, "where", None) or [
            getattr(r, "where", str(i)) for i, r in enumerate(getattr(self.train_loader.dataset, "records", []))]
        return [where[int(i)] if where else str(int(i)) for idx in step_indices for i in idx]

    def log_figures(self) -> dict:
        """What on_log hands to the callbacks: the training loss since the last log as a
        token-weighted mean (its host sync is the one sync of the interval), the learning
        rates the logged step used, and throughput over the interval (``interval`` holds the raw counts)."""
        s, now = self.state, time.perf_counter()
        t, examples, tokens, positions = self._mark
        interval = {"seconds": now - t, "examples": s.examples - examples, "tokens": s.tokens - tokens,
                    "positions": s.positions - positions}
        self._mark = (now, s.examples, s.tokens, s.positions)
        loss_sum, count = torch.stack((self._loss_sum, self._loss_count.to(self._loss_sum.dtype))).tolist()
        self._loss_sum.zero_()
        self._loss_count.zero_()
        return {"step": s.step, "epoch": s.epoch_float, "loss": loss_sum / count if count else None,
                "lr": self._step_lrs or self.current_lrs(), "speed": speed(**interval), "interval": interval,
                "time": now}

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> TrainState:
        s, cfg, plan = self.state, self.cfg, self.plan
        eval_at_epoch_end = cfg.eval_every is None
        self.fire("on_fit_start")
        if cfg.eval_before and s.step == 0 and not s.evals:  # a resumed run has its step 0 already
            self.run_eval()  # the starting weights, as step 0: a baseline, never the best (callbacks.py)
        self._mark = (time.perf_counter(), s.examples, s.tokens, s.positions)  # a resumed run measures from here
        while s.step < plan.total_steps and not s.should_stop:
            # Each epoch's order depends only on (seed, epoch); a resumed run skips the
            # micro-batches it already consumed, without loading them.
            self.train_loader.batch_sampler.set_epoch(s.epoch, start=s.micro)
            self.train_mode(self.model)
            self.fire("on_epoch_start")
            finite = torch.ones((), dtype=torch.bool, device=self.device)
            step_indices, unit, total = [], None, 0
            for i, batch in enumerate(self.train_loader, start=s.micro):
                if "attention_mask" in batch:  # counted on the host copy: no device sync
                    s.tokens += int(batch["attention_mask"].sum())
                    s.positions += batch["attention_mask"].numel()
                batch = self.to_device(batch)
                with self.autocast():
                    out = self.task.forward(self.model, batch)  # {"loss_sum": (), "count": () or int, "logits"}
                loss_sum, count = out["loss_sum"], out["count"]
                # Every micro-batch of the step backpropagates its sum over one common unit, the
                # first one's count: the accumulated gradient is then the exact sum, at a mean
                # loss's magnitude (fp16's loss scale sees what it always saw, and one
                # micro-batch per step is the plain mean). Rescaled to the mean below.
                if unit is None:
                    unit = count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
                self.scaler.scale(loss_sum / unit).backward()
                total = total + count
                finite &= torch.isfinite(loss_sum.detach())  # on-device; read once per step
                step_indices.append(batch["index"].cpu())
                self._loss_sum += loss_sum.detach().float()
                self._loss_count += count
                s.examples += batch.get("num_examples", len(batch["labels"]))  # packed rows hold several
                s.micro = i + 1
                if (i + 1) % cfg.grad_accum and i + 1 != plan.micro_per_epoch:
                    continue  # still accumulating (an epoch's last group may be shorter than grad_accum)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                grad_norm = None
                if cfg.max_grad_norm:
                    self.scaler.unscale_(self.optimizer)  # clip true gradients, not fp16-scaled ones
                if len(step_indices) > 1:  # one micro-batch: unit == total already
                    # mean over every target of the step (torchtune: scale by current_num_tokens)
                    grads = [p.grad for p in params if p.grad is not None]
                    scale = unit / (total.clamp(min=1) if torch.is_tensor(total) else max(total, 1))
                    if grads:
                        torch._foreach_mul_(grads, scale)  # one fused pass; a device scalar needs no sync
                if cfg.max_grad_norm:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                # fp16's GradScaler skips inf steps itself; for bf16/fp32 we check here
                # (one host sync per optimizer step, not per micro-batch).
                ok = bool(finite) and (grad_norm is None or bool(torch.isfinite(grad_norm)) or self.scaler.is_enabled())
                stepped = ok or not self.nonfinite(step_indices, bool(finite))
                if stepped:
                    self._step_lrs = self.current_lrs()  # the rates this step uses; the schedule moves on below
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    s.step += 1
                self.optimizer.zero_grad(set_to_none=True)
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                step_indices, unit, total = [], None, 0
                if not stepped:
                    continue
                s.epoch_float = s.epoch + (i + 1) / plan.micro_per_epoch
                if s.step % cfg.log_every == 0 or s.step == plan.total_steps:
                    self.fire("on_log", self.log_figures())  # before on_step_end: its checkpoint holds the line
                self.fire("on_step_end")
                if self.eval_due():
                    self.run_eval()
                if s.step >= plan.total_steps or s.should_stop:
                    break
            else:
                s.epoch, s.micro = s.epoch + 1, 0
                if eval_at_epoch_end and not s.should_stop:
                    self.run_eval()
                self.fire("on_epoch_end")
        if not s.interrupted and (not s.evals or s.evals[-1]["step"] != s.step):
            self.run_eval()  # always judge the final weights too
        self.fire("on_fit_end")
        return s

    def run_eval(self) -> dict:
        metrics = self.evaluate(self.val_loader, "validation")
        metrics["step"] = self.state.step
        self.state.evals.append(metrics)
        self.fire("on_eval_end", metrics)
        self.train_mode(self.model)
        return metrics

    def evaluate(self, loader, description: str = "eval") -> dict:
        return evaluate_loader(self.model, self.task, loader, self.metrics_factory(), self.device, self.autocast,
                               lambda it: self.track(it, len(loader), description))


@torch.inference_mode()
def evaluate_loader(model, task, loader, metrics, device, autocast=contextlib.nullcontext, track=iter) -> dict:
    """Stream a loader through the model, updating metrics batch by batch: a split's loss is
    its total loss sum over its total count, whatever the batching."""
    model.eval()
    t0 = time.perf_counter()
    for batch in track(loader):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast():
            out = task.forward(model, batch)  # {"loss_sum": (), "count": () or int, "logits": (B, C)}
        metrics.update(out["logits"], batch["labels"], loss_sum=out["loss_sum"], count=out["count"],
                       index=batch.get("index"))
    result = metrics.compute()
    result["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return result
