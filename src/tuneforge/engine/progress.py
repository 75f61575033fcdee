"""What a run shows while it trains: a live bar on a terminal, plain lines everywhere else.

- ``RichProgress``: rich bars for training and evaluation (one live display), for a console
  that is a terminal with ``train.progress: true``.
- ``PlainProgress``: one line per evaluation (``step 40 validation: accuracy 0.8100, loss
  0.4100 *``) whatever ``train.progress`` says, and with ``train.progress: true`` one line
  per log interval (``step 40/150 (epoch 1.33): loss 0.4211, lr 2.00e-05, 85.1 samples/s,
  eta 0:01:10``). For logs, files, CI and ``train.progress: false``: a bar redrawn into a
  file leaves ``train ━ … … eta …`` behind, and without a bar the evaluation lines vanished.

Both are ``DISPLAY`` callbacks (after ``BEST``: the evaluation line marks an improvement with
``*``); ``progress_callback`` picks one. ``quiet_library_bars`` keeps the Hugging Face
libraries' own bars out of such output too.
"""

from __future__ import annotations

import sys
import time

from .callbacks import DISPLAY, Callback

_SHOWN = ("loss", "accuracy", "f1_macro")  # after the metric that picks the best checkpoint


def progress_callback(console, log, show_progress: bool) -> Callback:
    """The display for this console: bars only on a terminal with progress on, else plain lines."""
    if show_progress and console is not None and console.is_terminal:
        return RichProgress(console)
    return PlainProgress(log, every_log=show_progress)


def quiet_library_bars(console):
    """Hugging Face libraries draw their own tqdm bars (loading and writing weights) on stderr;
    where the run's output is not a terminal, turn them off for the run. Returns the undo."""
    if console is None or console.is_terminal:
        return lambda: None
    from huggingface_hub import utils as hub  # transformers reads this switch when it is imported

    hub_on = not hub.are_progress_bars_disabled()
    hf = sys.modules.get("transformers.utils.logging")  # imported already: it keeps a switch of its own
    hf_on = hf.is_progress_bar_enabled() if hf else hub_on
    hub.disable_progress_bars()
    if hf:
        hf.disable_progress_bar()

    def undo() -> None:
        if hub_on:
            hub.enable_progress_bars()
        hf = sys.modules.get("transformers.utils.logging")
        if hf and hf_on:
            hf.enable_progress_bar()

    return undo


def eval_line(trainer, metrics: dict) -> str:
    """``step N validation: <metric_for_best> x, loss y, ... *`` (``*``: the best so far)."""
    first = getattr(trainer.cfg, "metric_for_best", None)
    names = [k for k in dict.fromkeys((first, *_SHOWN)) if k and isinstance(metrics.get(k), (int, float))]
    mark = " *" if trainer.state.improved() else ""
    what = "validation (starting weights)" if trainer.state.step == 0 else "validation"  # train.eval_before
    return f"step {trainer.state.step} {what}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in names) + mark


def speed_text(logs: dict) -> str:
    sp = logs["speed"]
    text = f"{sp.get('samples_per_s', 0):.1f} samples/s"
    if "tokens_per_s" in sp:
        text += f", {sp['tokens_per_s']:.0f} tok/s"
    if "mfu" in sp:
        text += f", MFU {100 * sp['mfu']:.1f}%"
    return text


class PlainProgress(Callback):
    """Plain lines through the run's log: evaluations always, training every log interval when
    ``every_log`` (with an eta from this process's pace)."""

    order = DISPLAY

    def __init__(self, log, every_log: bool = True):
        self.log, self.every_log = log, every_log
        self.t0, self.step0 = time.perf_counter(), 0

    def on_fit_start(self, trainer) -> None:
        self.t0, self.step0 = time.perf_counter(), trainer.state.step  # a resumed run's pace from here

    def on_log(self, trainer, logs: dict) -> None:
        if not self.every_log or logs["loss"] is None:
            return
        step, total = logs["step"], trainer.plan.total_steps
        done = step - self.step0
        eta = (time.perf_counter() - self.t0) / done * (total - step) if done > 0 else None
        self.log(f"step {step}/{total} (epoch {logs['epoch']:.2f}): loss {logs['loss']:.4f}, "
                 f"lr {max(logs['lr'].values()):.2e}, {speed_text(logs)}"
                 + (f", eta {_clock(eta)}" if eta is not None and step < total else ""))

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.log(eval_line(trainer, metrics))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichProgress(Callback):
    order = DISPLAY  # after BEST: the evaluation line marks an improvement

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None
        self.info = None  # the last log's figures, shown from the step that logged them

    def on_fit_start(self, trainer) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=trainer.plan.total_steps, info="")

    def on_log(self, trainer, logs: dict) -> None:
        if logs["loss"] is None:
            return
        self.info = f"loss {logs['loss']:.4f}  lr {max(logs['lr'].values()):.2e}  {speed_text(logs)}"

    def on_step_end(self, trainer) -> None:
        self.progress.update(self.task_id, advance=1, **({"info": self.info} if self.info else {}))
        self.info = None

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.progress.console.print(f"[cyan]{eval_line(trainer, metrics)}[/]", highlight=False)

    def track(self, iterable, total: int, description: str):
        if self.progress is None:
            yield from iterable
            return
        tid = self.progress.add_task(description, total=total, info="")
        for item in iterable:
            yield item
            self.progress.advance(tid)
        self.progress.remove_task(tid)

    def on_fit_end(self, trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
