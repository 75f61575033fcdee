"""Callbacks: the optional parts of training hook in through a few named events.

Each method is a no-op by default. A callback stops training by setting
``trainer.state.should_stop = True`` (with ``trainer.state.stop_reason``).

Events, in the order the loop fires them: ``on_fit_start``; per epoch ``on_epoch_start``;
per optimizer step ``on_log(logs)`` (every ``train.log_every`` steps and at the last one,
before the step's other events, so a checkpoint taken at this step holds its line), then
``on_step_end``, then ``on_eval_end(metrics)`` when an evaluation is due; ``on_epoch_end``;
``on_fit_end``. Besides: ``on_record(event)`` when something calls ``trainer.record`` (a
strategy's unfreeze), and ``on_checkpoint_request`` when the run asks for a resumable
checkpoint now (an interrupt between checkpoints). ``track(iterable, total, description)``
may wrap an evaluation's batches (a progress bar); the default hands them back.

``logs`` (Trainer.log_figures): ``step``, ``epoch`` (fractional), ``loss`` (the token-weighted
mean training loss since the last log, None if nothing trained), ``lr`` (per parameter
group: the rates the logged step used, so a warmup's first step shows its small rate), ``speed`` (samples_per_s; tokens_per_s and padding_fraction for text; mfu when
measured), ``interval`` (the raw seconds, examples, tokens, positions behind ``speed``) and
``time`` (perf_counter when measured).

Order. Every event visits the callbacks in ascending ``order`` (fastai's ``Callback.order``;
the Trainer sorts stably, so equal orders keep their list order). What a callback relies on
is declared by its order, never by where it sits in a list:

    MEASURE    -10  MFU: measures the machine before anything else starts; adds ``mfu`` to logs
    METRICS      0  RetainMonitor: adds retain_* / forgetting to an evaluation's metrics
    SCHEDULE    10  strategy callbacks: an unfreeze happens before the step's checkpoint
    LOG         20  MetricsLog: writes logs, records and evaluations to metrics.jsonl
    BEST        30  BestCheckpoint: writes ``state.best_step`` / ``best_metric`` (its declared
                    output; ``state.improved()`` reads it) for everything after it
    OBSERVE     40  the default: TensorBoard, MLflow, a user's callback
    STOP        50  EarlyStopping: reads BEST's output
    CHECKPOINT  80  ResumeCheckpoint: records the state all the others leave
    DISPLAY     90  progress bars

A dict handed to an event (``logs``, ``metrics``) may be added to by a callback: the ones
after it see the addition, which is what MEASURE and METRICS are for.

State. A callback that a resumed run needs to restore returns a dict from ``state_dict()``
(default None: nothing to keep) and takes it back in ``load_state_dict()``; the trainer
stores them in every resumable checkpoint, keyed by class name.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import TuneforgeError
from .checkpoint import save_checkpoint
from .throughput import peak_memory

MEASURE, METRICS, SCHEDULE, LOG, BEST, OBSERVE, STOP, CHECKPOINT, DISPLAY = -10, 0, 10, 20, 30, 40, 50, 80, 90


class Callback:
    order: int = OBSERVE

    def on_fit_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer) -> None: ...
    def on_log(self, trainer, logs: dict) -> None: ...
    def on_step_end(self, trainer) -> None: ...
    def on_eval_end(self, trainer, metrics: dict) -> None: ...
    def on_epoch_end(self, trainer) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    def on_record(self, trainer, event: dict) -> None: ...
    def on_checkpoint_request(self, trainer) -> None: ...

    def track(self, iterable, total: int, description: str):
        return iterable

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self, best_step: int | None) -> dict | None:
        """A section for the run's final metrics (eval.json), or None (RetainMonitor: "forgetting")."""
        return None


class MetricsLog(Callback):
    """Appends one JSON line per log, record and evaluation to ``metrics.jsonl``."""

    order = LOG

    def __init__(self, path: Path):
        self.path = Path(path)
        self.t0 = time.perf_counter()
        self.lines = 0

    def on_fit_start(self, trainer) -> None:
        self.t0 = time.perf_counter()

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

    def on_log(self, trainer, logs: dict) -> None:
        self.write({"event": "train", "step": logs["step"], "epoch": round(logs["epoch"], 4), "loss": logs["loss"],
                    "lr": logs["lr"], **logs["speed"], **peak_memory(trainer.device),
                    "elapsed_s": round(logs["time"] - self.t0, 2)})

    def on_record(self, trainer, event: dict) -> None:
        self.write(event)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        s = trainer.state
        self.write({"event": "eval", "split": "validation", "step": s.step, "epoch": round(s.epoch_float, 4),
                    **{k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))}})


class BestCheckpoint(Callback):
    """Keeps the best weights by ``metric_for_best`` on disk (``checkpoints/best``).

    Declared output, for the callbacks ordered after it: ``trainer.state.best_metric`` and
    ``trainer.state.best_step`` (the step of the best evaluation so far), written in
    ``on_eval_end``; ``trainer.state.improved()`` says whether this step's evaluation is it.

    The evaluation of the starting weights (``train.eval_before``, step 0) is a baseline, not a
    candidate: a run always ends with weights it trained (a LoRA run never saves its zero
    adapter as "best"), and whether training beat the start is said in the run's summary
    (``run/finish.py``) rather than hidden by handing the start back. Its metric name is
    checked all the same, so a wrong ``metric_for_best`` fails before the first step."""

    order = BEST

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
        if trainer.state.step == 0:  # the starting weights (train.eval_before): the baseline, never the best
            return
        # Forgetting budget (retain.max_drop): an evaluation over budget is never preferred to one
        # within it; until one is within it, the least-forgetting one is kept (a run always has a best).
        eligible = metrics.get("within_forgetting_budget") is not False
        if eligible:
            better = not self.best_eligible or self.improved(value)
        else:
            better = not self.best_eligible and (self.best_forgetting is None
                                                 or metrics["forgetting"] < self.best_forgetting)
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
    callback state) after every evaluation, every ``save_every`` steps and when the run
    asks for one; keeps the newest ``keep``. Ordered after every callback with state
    (CHECKPOINT): it records the state the others leave."""

    order = CHECKPOINT

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
        if trainer.state.step:  # step 0 (train.eval_before): nothing trained yet, nothing to resume
            self.save(trainer)

    def on_checkpoint_request(self, trainer) -> None:
        self.save(trainer)


class EarlyStopping(Callback):
    """Stops after ``patience`` evaluations without improvement of the best metric, as
    BestCheckpoint declares it (``state.improved()``; STOP is ordered after BEST)."""

    order = STOP

    def __init__(self, patience: int):
        self.patience, self.bad = patience, 0

    def on_eval_end(self, trainer, metrics: dict) -> None:
        if trainer.state.step == 0:  # the starting weights (train.eval_before) are not an evaluation of training
            return
        self.bad = 0 if trainer.state.improved() else self.bad + 1
        if self.bad >= self.patience:
            trainer.state.should_stop = True
            trainer.state.stop_reason = f"early stopping: no improvement in {self.patience} evaluations"

    def state_dict(self) -> dict:
        return {"bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.bad = state["bad"]
