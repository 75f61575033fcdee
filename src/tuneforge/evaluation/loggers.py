"""Optional experiment loggers, as callbacks (`output.loggers`). Each imports its library
only when asked for, with an error that names the extra to install."""

from __future__ import annotations

from pathlib import Path

from ..engine.callbacks import Callback
from ..errors import TuneforgeError


class TensorBoardLog(Callback):
    """Training loss, learning rate per parameter group, throughput and every scalar validation
    metric, as TensorBoard scalars in ``<run>/tensorboard``."""

    def __init__(self, directory: Path, log_every: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TuneforgeError("output.loggers includes tensorboard but the tensorboard package is not installed: "
                                 "pip install 'tuneforge[tensorboard]' (or remove it from output.loggers)") from None
        self.writer = SummaryWriter(log_dir=str(directory))
        self.log_every = log_every

    def on_step_end(self, trainer) -> None:
        s = trainer.state
        if s.step % self.log_every and s.step != trainer.total_steps:
            return
        for group, lr in trainer.current_lrs().items():
            self.writer.add_scalar(f"lr/{group}", lr, s.step)
        # MetricsLog (earlier in the list) has just taken the loss and the speed of this interval
        if s.last_train_loss is not None:
            self.writer.add_scalar("train/loss", s.last_train_loss, s.step)
        for key, value in (s.last_speed or {}).items():
            self.writer.add_scalar(f"speed/{key}", value, s.step)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"validation/{key}", value, trainer.state.step)
        self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        self.writer.close()


def build_loggers(names: list[str], run_path: Path, log_every: int) -> list[Callback]:
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardLog(run_path / "tensorboard", log_every))
    return out
