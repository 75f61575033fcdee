"""The training engine: one loop (trainer.py) and the small parts it uses."""

from .callbacks import Callback
from .plan import TrainPlan
from .trainer import Trainer, TrainState

__all__ = ["Callback", "Trainer", "TrainPlan", "TrainState"]
