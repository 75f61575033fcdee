"""Callbacks: the optional parts of training hook in through a few named events.

Each method is a no-op by default. A callback stops training by setting
``trainer.state.should_stop = True`` (with ``trainer.state.stop_reason``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import TuneforgeError
from .checkpoint import save_checkpoint


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
        self.last_examples = 0

    def write(self, event: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def on_step_end(self, trainer) -> None:
        s = trainer.state
        if s.step % self.log_every and s.step != trainer.total_steps:
            return
        now = time.perf_counter()
        rate = (s.examples - self.last_examples) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_examples = now, s.examples
        loss = trainer.pop_train_loss()  # the only host sync of the step, every log_every steps
        s.last_train_loss = loss
        self.write({"event": "train", "step": s.step, "epoch": round(s.epoch_float, 4), "loss": loss,
                    "lr": trainer.current_lrs(), "samples_per_s": round(rate, 2),
                    "elapsed_s": round(now - self.t0, 2)})

    def on_eval_end(self, trainer, metrics: dict) -> None:
        s = trainer.state
        self.write({"event": "eval", "split": "validation", "step": s.step, "epoch": round(s.epoch_float, 4),
                    **{k: v for k, v in metrics.items() if k != "confusion_matrix"}})


class BestCheckpoint(Callback):
    """Keeps the best model by ``metric_for_best`` (on disk, atomically) and,
    optionally, periodic checkpoints, pruning the oldest beyond ``keep``."""

    def __init__(self, directory: Path, metric: str, minimize: bool, save_every: int | None = None,
                 keep: int = 2, min_delta: float = 0.0):
        self.dir, self.metric, self.minimize = Path(directory), metric, minimize
        self.save_every, self.keep, self.min_delta = save_every, keep, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.periodic: list[Path] = []

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.minimize else value > self.best + self.min_delta

    def on_eval_end(self, trainer, metrics: dict) -> None:
        if self.metric not in metrics:
            valid = ", ".join(k for k, v in metrics.items() if isinstance(v, float))
            raise TuneforgeError(f"train.metric_for_best '{self.metric}' is not a validation metric; choose one of: {valid}")
        value = metrics[self.metric]
        trainer.state.last_improved = self.improved(value)
        if trainer.state.last_improved:
            self.best, self.best_step = value, trainer.state.step
            trainer.state.best_metric, trainer.state.best_step = value, trainer.state.step
            save_checkpoint(self.dir / "best", trainer.model,
                            meta={"step": trainer.state.step, "epoch": trainer.state.epoch_float,
                                  self.metric: value, "metrics": {k: v for k, v in metrics.items()}})

    def on_step_end(self, trainer) -> None:
        s = trainer.state
        if not self.save_every or s.step % self.save_every:
            return
        path = save_checkpoint(self.dir / f"step-{s.step:08d}", trainer.model, optimizer=trainer.optimizer,
                               scheduler=trainer.scheduler, meta={"step": s.step, "epoch": s.epoch_float})
        self.periodic.append(path)
        while len(self.periodic) > self.keep:
            shutil.rmtree(self.periodic.pop(0), ignore_errors=True)


class EarlyStopping(Callback):
    """Stops after ``patience`` evaluations without improvement of the best metric."""

    def __init__(self, patience: int):
        self.patience, self.bad = patience, 0

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.bad = 0 if trainer.state.last_improved else self.bad + 1
        if self.bad >= self.patience:
            trainer.state.should_stop = True
            trainer.state.stop_reason = f"early stopping: no improvement in {self.patience} evaluations"
