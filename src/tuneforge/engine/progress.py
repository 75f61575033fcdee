"""Rich progress bars for training and evaluation (one live display)."""

from __future__ import annotations

import time

from .callbacks import DISPLAY, Callback


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
        self.t0, self.seen0 = time.perf_counter(), 0

    def on_log(self, trainer, logs: dict) -> None:
        if logs["loss"] is None:
            return
        lr, sp = max(logs["lr"].values()), logs["speed"]
        self.info = f"loss {logs['loss']:.4f}  lr {lr:.2e}  {sp.get('samples_per_s', 0):.1f} samples/s"
        if "tokens_per_s" in sp:
            self.info += f"  {sp['tokens_per_s']:.0f} tok/s"
        if "mfu" in sp:
            self.info += f"  MFU {100 * sp['mfu']:.1f}%"

    def on_step_end(self, trainer) -> None:
        self.progress.update(self.task_id, advance=1, **({"info": self.info} if self.info else {}))
        self.info = None

    def on_eval_end(self, trainer, metrics: dict) -> None:
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "accuracy", "f1_macro") if k in metrics)
        mark = " *" if trainer.state.improved() else ""
        self.progress.console.print(f"[cyan]step {trainer.state.step}[/] validation: {shown}{mark}")

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
