"""Rich progress bars for training and evaluation (one live display)."""

from __future__ import annotations

import time

from .callbacks import Callback


class RichProgress(Callback):
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None

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

    def on_step_end(self, trainer) -> None:
        s = trainer.state
        info = None
        if s.last_train_loss is not None and (s.step % trainer.cfg.log_every == 0):
            lr = max(trainer.current_lrs().values())
            sp = getattr(s, "last_speed", {}) or {}
            info = f"loss {s.last_train_loss:.4f}  lr {lr:.2e}  {sp.get('samples_per_s', 0):.1f} samples/s"
            if "tokens_per_s" in sp:
                info += f"  {sp['tokens_per_s']:.0f} tok/s"
            if "mfu" in sp:
                info += f"  MFU {100 * sp['mfu']:.1f}%"
        self.progress.update(self.task_id, advance=1, **({"info": info} if info else {}))

    def on_eval_end(self, trainer, metrics: dict) -> None:
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "accuracy", "f1_macro") if k in metrics)
        mark = " *" if trainer.state.last_improved else ""
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
