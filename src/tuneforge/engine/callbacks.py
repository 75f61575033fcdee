"""Callbacks: the optional parts of training hook in through a few named events.

Each method is a no-op by default. A callback stops training by setting
``trainer.state.should_stop = True`` (with ``trainer.state.stop_reason``).
A callback with state that a resumed run needs defines ``state_dict()`` and
``load_state_dict()``; the trainer stores them in every resumable checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import TuneforgeError
from .checkpoint import save_checkpoint
from .throughput import peak_memory


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer) -> None: ...
    def on_step_end(self, trainer) -> None: ...
    def on_eval_end(self, trainer, metrics: dict) -> None: ...
    def on_epoch_end(self, trainer) -> None: ...
    def on_fit_end(self, trainer) -> None: ...


class MetricsLog(Callback):
    """Appends one JSON line per log/eval event to ``metrics.jsonl``."""

    def __init__(self, path: Path, log_every: int):
        self.path, self.log_every = Path(path), log_every
        self.t0 = self.last_t = time.perf_counter()
        self.last = (0, 0, 0)  # examples, tokens, positions at the previous log line
        self.lines = 0

    def on_fit_start(self, trainer) -> None:
        s = trainer.state
        self.t0 = self.last_t = time.perf_counter()
        self.last = (s.examples, s.tokens, s.positions)  # a resumed run measures from where it resumed

    def write(self, event: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        self.lines += 1

    def state_dict(self) -> dict:
        return {"lines": self.lines}

    def load_state_dict(self, state: dict) -> None:
        """Drop events written after the checkpoint: the resumed run writes them again."""
        self.lines = state["lines"]
        if self.path.exists():
            kept = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[: self.lines]
            self.path.write_text("".join(kept), encoding="utf-8")

    def on_step_end(self, trainer) -> None:
        s = trainer.state
        if s.step % self.log_every and s.step != trainer.plan.total_steps:
            return
        now = time.perf_counter()
        last = self.last
        speed = trainer.speed(now - self.last_t, s.examples - last[0], s.tokens - last[1], s.positions - last[2])
        self.last_t, self.last = now, (s.examples, s.tokens, s.positions)
        loss = trainer.pop_train_loss()  # the host sync for the loss, every log_every steps
        s.last_train_loss, s.last_speed = loss, speed
        self.write({"event": "train", "step": s.step, "epoch": round(s.epoch_float, 4), "loss": loss,
                    "lr": trainer.current_lrs(), **speed, **peak_memory(trainer.device),
                    "elapsed_s": round(now - self.t0, 2)})

    def on_eval_end(self, trainer, metrics: dict) -> None:
        s = trainer.state
        self.write({"event": "eval", "split": "validation", "step": s.step, "epoch": round(s.epoch_float, 4),
                    **{k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))}})


class BestCheckpoint(Callback):
    """Keeps the best weights by ``metric_for_best`` on disk (``checkpoints/best``)."""

    def __init__(self, directory: Path, metric: str, minimize: bool, min_delta: float = 0.0):
        self.dir, self.metric, self.minimize, self.min_delta = Path(directory), metric, minimize, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_eligible = False  # within the forgetting budget (always, without one)
        self.best_forgetting: float | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.minimize else value > self.best + self.min_delta

    def on_eval_end(self, trainer, metrics: dict) -> None:
        if self.metric not in metrics:
            valid = ", ".join(k for k, v in metrics.items() if isinstance(v, float))
            raise TuneforgeError(f"train.metric_for_best '{self.metric}' is not a validation metric; choose one of: {valid}")
        value = metrics[self.metric]
        if value is None:  # e.g. roc_auc on a validation split that lacks a class
            raise TuneforgeError(f"train.metric_for_best '{self.metric}' is undefined on this validation split "
                                 "(some class has no examples, or every example); pick another metric or a "
                                 "validation split that holds every class")
        # Forgetting budget (retain.max_drop): an evaluation over budget is never preferred to one
        # within it; until one is within it, the least-forgetting one is kept (a run always has a best).
        eligible = metrics.get("within_forgetting_budget") is not False
        if eligible:
            better = not self.best_eligible or self.improved(value)
        else:
            better = not self.best_eligible and (self.best_forgetting is None
                                                 or metrics["forgetting"] < self.best_forgetting)
        trainer.state.last_improved = better
        if better:
            self.best, self.best_step = value, trainer.state.step
            self.best_eligible, self.best_forgetting = eligible, metrics.get("forgetting")
            trainer.state.best_metric, trainer.state.best_step = value, trainer.state.step
            save_checkpoint(self.dir / "best", trainer.model, names=trainer.optimized_names,
                            meta={"step": trainer.state.step, "epoch": trainer.state.epoch_float,
                                  self.metric: value, "metrics": {k: v for k, v in metrics.items()}})

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "best_eligible": self.best_eligible,
                "best_forgetting": self.best_forgetting}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_eligible = state.get("best_eligible", self.best is not None)
        self.best_forgetting = state.get("best_forgetting")


class ResumeCheckpoint(Callback):
    """Resumable checkpoints (weights, optimizer, scheduler, scaler, RNG, data position,
    callback state) after every evaluation and every ``save_every`` steps; keeps the
    newest ``keep``. Must run after the callbacks whose state it records."""

    def __init__(self, directory: Path, save_every: int | None = None, keep: int = 2):
        self.dir, self.save_every, self.keep = Path(directory), save_every, keep

    def save(self, trainer) -> None:
        s = trainer.state
        path = self.dir / f"step-{s.step:08d}"
        save_checkpoint(path, trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                        scaler=trainer.scaler, meta=trainer.checkpoint_meta(), with_rng=True,
                        names=trainer.optimized_names)
        s.last_checkpoint_step = s.step
        older = sorted(p for p in self.dir.glob("step-*") if p != path)
        for stale in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def on_step_end(self, trainer) -> None:
        # When an evaluation follows at this step, save after it instead: a checkpoint
        # taken between the step and its evaluation would resume past the evaluation.
        if self.save_every and trainer.state.step % self.save_every == 0 and not trainer.eval_due():
            self.save(trainer)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.save(trainer)


class EarlyStopping(Callback):
    """Stops after ``patience`` evaluations without improvement of the best metric."""

    def __init__(self, patience: int):
        self.patience, self.bad = patience, 0

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.bad = 0 if trainer.state.last_improved else self.bad + 1
        if self.bad >= self.patience:
            trainer.state.should_stop = True
            trainer.state.stop_reason = f"early stopping: no improvement in {self.patience} evaluations"

    def state_dict(self) -> dict:
        return {"bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.bad = state["bad"]
