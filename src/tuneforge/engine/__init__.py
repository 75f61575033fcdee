"""The training engine: one loop (trainer.py) and the small parts it uses."""

from .callbacks import Callback
from .trainer import Trainer, TrainState

__all__ = ["Callback", "Trainer", "TrainState"]
