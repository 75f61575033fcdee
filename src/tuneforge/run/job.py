"""The run being built: one object that every stage of ``finetune`` reads and fills.

A :class:`Job` starts with the recipe and the caller's wishes (resume, warm start, ...);
the stages in ``run/build.py`` and ``run/finish.py`` are plain functions over it, each
filling the fields it is responsible for, in the order ``run/finetune.py`` calls them:

    read_data        task, splits, skipped, rows, labels, fingerprints
    check_run_dir    run (chosen, checked and locked; nothing written yet), checkpoint (a resume's)
    build_model      loaded, model, strategy, decision   (nothing written yet)
    open_run_dir     the run directory made ready: a new run's recipe and manifest, or the resumed run's
    build_data       datasets, loaders (speed-ups may replace them: caches)
    build_trainer    trainer (complete: optimizer, schedule, callbacks)
    train            state (the loop's result)
    finish           final (metrics, saved model, eval.json, manifest)

Whatever a stage changes outside the job (torch's thread count, patched forwards, flushed
denormals) it undoes through :meth:`Job.on_exit`, so a finished or failed run leaves the
process as it found it — torchtune's recipe ``cleanup()``, as a list.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Log:
    """The run's console log: one line per call, rich markup allowed; silent without a console."""

    def __init__(self, console):
        self.console = console

    def __call__(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, soft_wrap=True)


@dataclass
class Job:
    # -- what the caller asked for
    recipe: Any                              # the validated Recipe
    origin: str | None = None                # the recipe file, when it came from one
    argv: list[str] | None = None            # the command line recorded in the manifest
    overwrite: bool | None = None            # replace an existing run directory (None: the recipe's output.overwrite)
    resume: str | None = None                # a run directory or "auto": continue it exactly
    init_from: str | None = None             # a run directory whose final weights start this run
    callbacks: list = field(default_factory=list)  # the caller's own callbacks (the job service's events, its stop)
    console: Any = None
    log: Callable[[str], None] = print
    # -- where and how it computes
    device: Any = None                       # torch.device
    amp_dtype: Any = None                    # torch dtype of autocast, None for fp32
    # -- data
    task: Any = None                         # the registered Task for recipe.task.type
    splits: dict = field(default_factory=dict)        # split -> records
    skipped: dict = field(default_factory=dict)       # split -> bad records skipped
    rows: dict = field(default_factory=dict)          # split -> rows read
    fingerprints: dict = field(default_factory=dict)  # split -> file fingerprint
    labels: Any = None                       # LabelMap
    # -- model
    loaded: Any = None                       # LoadedModel: backbone, ModelInfo, tokenizer
    model: Any = None                        # the module that trains (the strategy may wrap it)
    strategy: Any = None                     # the concrete Strategy (auto: the one it chose)
    decision: dict | None = None             # auto's decision, for the manifest
    warm_start: dict | None = None           # init_from: the source model and its sha256 (artifact.copy_run_weights)
    # -- the run directory
    run: Any = None                          # RunDir (with its lock from check_run_dir on)
    checkpoint: Path | None = None           # the checkpoint a resumed run continues from
    # -- batches and training
    datasets: dict = field(default_factory=dict)  # split -> Dataset
    loaders: dict = field(default_factory=dict)   # split -> DataLoader (a cache may have replaced them)
    batch_layout: Callable | None = None          # device-side batch preparation (channels-last images)
    trainer: Any = None
    mfu: Any = None                               # the MFU callback: its figures go into the manifest
    state: Any = None                             # TrainState after training
    final: dict = field(default_factory=dict)     # final metrics (eval.json)
    speedups: dict = field(default_factory=dict)  # name -> {"applied": bool, "why": str}
    timings: dict = field(default_factory=dict)   # seconds per stage (manifest "timings")
    started: float = field(default_factory=time.perf_counter)
    _undo: list = field(default_factory=list, repr=False)

    @property
    def cfg(self):
        """The recipe's train section (the knobs of optimisation, precision and speed)."""
        return self.recipe.train

    def autocast(self):
        """A fresh autocast context for the run's precision (a no-op context for fp32)."""
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def on_exit(self, undo: Callable[[], None]) -> None:
        """Register what to undo when the run ends, however it ends (last registered, first undone)."""
        self._undo.append(undo)

    def close(self) -> None:
        """Undo everything registered with :meth:`on_exit`, newest first; an undo that fails
        does not stop the others."""
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as err:  # noqa: BLE001 - cleaning up must not hide the run's own outcome
                self.log(f"[yellow]warning: could not undo {getattr(undo, '__qualname__', undo)}: {err}[/]")
