"""Job events (OpenAI's ``fine_tuning.job.event``) and the engine callback that writes them.

:class:`ServiceCallback` hooks into a job's run like any other callback (``engine/callbacks.py``):
every training-loss line and every evaluation becomes a ``metrics`` event, every resumable
checkpoint a ``fine_tuning.job.checkpoint`` row; and at the end of every optimizer step it reads
the flag the worker's heartbeat thread sets (cancel, pause, worker stopping, job taken away) and
stops the loop the way SIGINT does: the step finishes, a resumable checkpoint is written, and
``finetune`` raises ``RunInterrupted`` — so "cancel" keeps every checkpoint, and "pause" is the
same stop with the job left resumable.
"""

from __future__ import annotations

import math
import threading
import time

from ..engine.callbacks import CHECKPOINT, Callback
from .db import Checkpoint, Event, new_id, now


def add_event(session, job_id: str, message: str, level: str = "info", data: dict | None = None,
              type: str = "message") -> None:
    session.add(Event(id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, type=type,
                      message=message, data=data))


def event_object(e) -> dict:
    return {"id": e.id, "object": "fine_tuning.job.event", "created_at": int(e.created_at), "level": e.level,
            "message": e.message, "data": e.data, "type": e.type}


def checkpoint_object(c, job) -> dict:
    name = (job.fine_tuned_model or f"ft:{job.model}:{job.suffix or ''}:{job.id}") + f":ckpt-step-{c.step_number}"
    return {"id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": int(c.created_at),
            "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job.id, "step_number": c.step_number,
            "metrics": c.metrics}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


class Control:
    """What the heartbeat thread tells the training thread: a stop request and its reason."""

    def __init__(self):
        self.reason: str | None = None   # cancel | pause | stopping | lost
        self.lock = threading.Lock()
        self.step = 0
        self.total_steps: int | None = None
        self.tokens = 0
        self.train_started: tuple[float, int] | None = None  # (time, step) of this attempt's first step
        self.seen_step: int | None = None

    def request(self, reason: str) -> None:
        with self.lock:
            if self.reason is None or reason in ("lost", "stopping"):
                self.reason = reason
                self.seen_step = self.step  # the step the training thread had finished when the request came


class ServiceCallback(Callback):
    order = CHECKPOINT + 5  # after the resumable checkpoint of the step: last_checkpoint_step is current

    def __init__(self, db, job_id: str, control: Control):
        self.db, self.job_id, self.control = db, job_id, control
        self.last_train: dict = {}
        self.last_valid: dict = {}
        self.recorded_step: int | None = None

    def _write(self, fn) -> None:
        with self.db.write() as s:
            fn(s)

    def on_fit_start(self, trainer) -> None:
        self.control.total_steps = trainer.plan.total_steps
        self.control.step = trainer.state.step
        self.control.train_started = (time.time(), trainer.state.step)
        self.recorded_step = trainer.state.last_checkpoint_step
        self._check_stop(trainer)

    def on_log(self, trainer, logs: dict) -> None:
        self.last_train = {"step": logs["step"], "train_loss": _number(logs["loss"])}
        data = {**self.last_train, "total_steps": trainer.plan.total_steps, "epoch": round(logs["epoch"], 4),
                "lr": max(logs["lr"].values()) if logs["lr"] else None,
                **{k: _number(v) for k, v in logs["speed"].items()}}
        loss = f"{logs['loss']:.4f}" if _number(logs["loss"]) is not None else "n/a"
        self._write(lambda s: add_event(s, self.job_id, f"Step {logs['step']}/{trainer.plan.total_steps}: training "
                                                        f"loss={loss}", data=data, type="metrics"))

    def on_eval_end(self, trainer, metrics: dict) -> None:
        step = trainer.state.step
        self.last_valid = {f"valid_{k}": _number(v) for k, v in metrics.items()
                           if _number(v) is not None and k not in ("step", "eval_seconds")}
        data = {"step": step, "total_steps": trainer.plan.total_steps, **self.last_valid}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in list(self.last_valid.items())[:4])
        self._write(lambda s: add_event(s, self.job_id, f"Step {step}: validation {shown}", data=data, type="metrics"))
        self._record_checkpoint(trainer)

    def on_step_end(self, trainer) -> None:
        s = trainer.state
        self.control.step, self.control.tokens = s.step, s.tokens
        self._record_checkpoint(trainer)
        self._check_stop(trainer)

    def on_checkpoint_request(self, trainer) -> None:  # the interrupt's own checkpoint (written before this runs)
        self._record_checkpoint(trainer)

    def on_fit_end(self, trainer) -> None:
        self.control.step, self.control.tokens = trainer.state.step, trainer.state.tokens
        self._record_checkpoint(trainer)

    def _record_checkpoint(self, trainer) -> None:
        step = trainer.state.last_checkpoint_step
        if step is None or step == self.recorded_step:
            return
        self.recorded_step = step
        metrics = {"step": float(step), "train_loss": self.last_train.get("train_loss"),
                   "valid_loss": self.last_valid.get("valid_loss"),
                   "valid_mean_token_accuracy": self.last_valid.get("valid_token_accuracy")}

        def write(s):
            from sqlalchemy import select

            exists = s.execute(select(Checkpoint).where(Checkpoint.job_id == self.job_id,
                                                        Checkpoint.step_number == step)).scalar_one_or_none()
            if exists is None:
                s.add(Checkpoint(id=new_id("ftckpt"), job_id=self.job_id, step_number=step, metrics=metrics,
                                 created_at=now()))
        self._write(write)

    def _check_stop(self, trainer) -> None:
        reason = self.control.reason
        if reason and not trainer.state.should_stop:
            s = trainer.state
            s.should_stop = s.interrupted = True  # finetune's train(): checkpoint, then RunInterrupted
            s.stop_reason = f"stopped by the job service ({reason})"
