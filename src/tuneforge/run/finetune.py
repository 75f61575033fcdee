"""From a recipe to a fine-tuned model: the algorithm box.

    recipe -> data records -> labels -> pretrained model (+ModelInfo) -> task head -> strategy
    -> run directory -> datasets/loaders (+caches) -> optimizer/schedule -> Trainer.fit()
    -> best weights -> final evaluation -> saved model + manifest + report

Each step is a stage function over one :class:`~tuneforge.run.job.Job` (``run/build.py``,
``run/finish.py``); speed-ups are decided at their stage (``speed/``). This module holds only
the order of the stages and the guard around them: signals stop training cleanly, an
out-of-memory error or a full disk names the fix, and the manifest always tells how the run
ended (or, for a run killed outright, its lock shows that its process is gone).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TuneforgeError
from ..recipe import Recipe, load_recipe
from ..speed import apply_speedups
from .build import (build_data, build_model, build_trainer, check_run_dir, open_run_dir, prepare_task, read_data,
                    resolve_compute, seed_everything)
from .finish import drop_resumable, finish, record_completion, write_report
from .job import Job, Log


@dataclass
class RunResult:
    """What ``finetune`` returns: the run directory, its final metrics, the recipe, the evaluations."""

    path: Path
    metrics: dict
    recipe: Recipe
    history: list = field(default_factory=list)


def finetune(recipe: Recipe | dict | str | Path | None = None, *, overrides: list[str] | None = None, console=None,
             argv: list[str] | None = None, overwrite: bool | None = None, resume: str | None = None,
             init_from: str | None = None, callbacks: list | None = None) -> RunResult:
    """Run a recipe end to end; return a :class:`RunResult`.

    ``resume``: a run directory (or ``"auto"``) to continue exactly from its newest valid
    checkpoint; with a run directory the recipe may be left out (the run's own is used).
    ``init_from``: a run directory whose final weights start a new run (``model.init_from``).
    ``callbacks``: more engine callbacks (``engine/callbacks.py``; each declares its ``order``),
    e.g. the job service's, which streams metrics into its database and stops a cancelled job.
    """
    from rich.console import Console

    from .resume import recipe_of_run

    if resume and init_from:
        raise TuneforgeError("--resume continues a run exactly and --init-from starts a new one; use one of them")
    if recipe is None and (not resume or resume == "auto"):
        raise TuneforgeError("no recipe: give the recipe file, or resume a run from its own record with "
                             "`tuneforge train --resume RUN_DIR`")
    origin = str(recipe) if isinstance(recipe, (str, Path)) else None
    console = console if console is not None else Console(stderr=True)
    loaded = load_recipe(recipe, overrides) if recipe is not None else recipe_of_run(Path(resume), overrides)
    if init_from:  # --init-from wins over model.init_from, and is recorded in config.yaml: a resume re-applies it
        loaded.model.init_from = str(init_from)
    job = Job(loaded, origin=origin, argv=argv, overwrite=overwrite, resume=resume, init_from=loaded.model.init_from,
              console=console, log=Log(console), callbacks=list(callbacks or ()))
    try:
        resolve_compute(job)
        apply_speedups(job, "start")
        read_data(job)        # read and checked before anything is written or loaded
        check_run_dir(job)    # refusals before the model loads; the directory locked until the run ends
        build_model(job)      # also before anything is written: a wrong model costs nothing
        apply_speedups(job, "model")
        open_run_dir(job)
        with guarded(job):    # from here on, the manifest records how the run ended
            build_data(job)
            apply_speedups(job, "data")
            prepare_task(job)
            build_trainer(job)
            apply_speedups(job, "train")
            train_s = train(job)
            finish(job)
            record_completion(job, train_s)
        drop_resumable(job)   # after "completed": a kill in between leaves a complete run
    finally:
        job.close()           # every speed-up undone (threads, patched forwards, denormals); the lock released
    if job.recipe.output.report:
        write_report(job.run.path, job.log)
    return RunResult(path=job.run.path, metrics=job.final, recipe=job.recipe, history=job.state.evals)


def train(job) -> float:
    """``Trainer.fit()`` under the signal guard; an interrupted run saves and says how to continue."""
    trainer = job.trainer
    t0 = time.perf_counter()
    with _stop_on_signals(trainer.state, job.log):
        job.state = state = trainer.fit()
    train_s = time.perf_counter() - t0
    if state.interrupted:
        if state.last_checkpoint_step != state.step:
            trainer.save_resumable()
        job.run.update_manifest(status="interrupted", steps=state.step)
        command = f"tuneforge train --resume {job.run.path}"
        raise RunInterrupted(f"interrupted at step {state.step}; checkpoint saved in {job.run.checkpoints}; "
                             f"continue with: {command}")
    if state.stop_reason:
        job.log(state.stop_reason)
    return train_s


@contextlib.contextmanager
def guarded(job):
    """Everything inside is recorded in the manifest if it fails, so a run directory never looks
    complete (or silently "running") when it is not; out of memory becomes an error naming the fix."""
    try:
        yield
    except RunInterrupted:
        raise
    except BaseException as err:
        from ..engine.checkpoint import is_disk_full

        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        full = is_disk_full(err)
        try:  # whatever failed left nothing half-written behind (checkpoints clean up), so this fits
            job.run.update_manifest(status=status, error=f"{'disk full: ' if full else ''}{type(err).__name__}: "
                                                         f"{str(err)[:500]}")
        except OSError as record_err:
            job.log(f"[yellow]warning: could not record the failure in {job.run.path / 'manifest.json'} "
                    f"({record_err.strerror or record_err})[/]")
        if full:
            from ..engine.checkpoint import CheckpointWriteError

            free = shutil.disk_usage(job.run.path).free >> 20
            last = job.trainer.state.last_checkpoint_step if job.trainer else None
            what = (f"checkpoint '{err.name}'" if isinstance(err, CheckpointWriteError) else
                    f"'{Path(err.filename).name}'" if getattr(err, "filename", None) else "its files")
            raise TuneforgeError(
                f"disk full while writing {what} of {job.run.path} (No space left on device; {free} MB free there); "
                "nothing half-written was left behind and the checkpoints before it are intact — free disk space (or "
                "move output.dir to a larger disk), then "
                + (f"continue from step {last} with `tuneforge train --resume {job.run.path}`" if last
                   else "train again with --overwrite")) from None
        if _out_of_memory(err):
            last = job.trainer.state.last_checkpoint_step if job.trainer else None
            raise TuneforgeError(
                f"out of memory ({str(err).splitlines()[0][:160]}) with train.batch_size {job.cfg.batch_size}; lower "
                "train.batch_size and raise train.grad_accum to keep the effective batch, shorten task.max_length "
                "or task.image_size, or use a lighter strategy (lora, linear-probe)"
                + (f"; the last checkpoint (step {last}) resumes with --resume {job.run.path}" if last else "")) from err
        raise


class RunInterrupted(TuneforgeError):
    """SIGINT/SIGTERM stopped training; a resumable checkpoint was saved first."""


@contextlib.contextmanager
def _stop_on_signals(state, log):
    """First SIGINT/SIGTERM: finish the current step, save, exit. A second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        state.should_stop = state.interrupted = True
        state.stop_reason = f"{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)"
        log(f"[yellow]{state.stop_reason}[/]")
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(err, RuntimeError) and any(t in text for t in ("out of memory", "can't allocate memory",
                                                                  "not enough memory")))


__all__ = ["RunInterrupted", "RunResult", "finetune", "seed_everything"]
