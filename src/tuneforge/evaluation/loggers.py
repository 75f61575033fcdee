"""Optional experiment loggers, as callbacks (`output.loggers`). Each imports its library
only when asked for, with an error that names the extra to install."""

from __future__ import annotations

from pathlib import Path

from ..engine.callbacks import Callback
from ..errors import TuneforgeError


class TensorBoardLog(Callback):
    """Training loss, learning rate per parameter group, throughput and every scalar validation
    metric, as TensorBoard scalars in ``<run>/tensorboard``."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TuneforgeError("output.loggers includes tensorboard but the tensorboard package is not installed: "
                                 "pip install 'tuneforge[tensorboard]' (or remove it from output.loggers)") from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def on_log(self, trainer, logs: dict) -> None:
        step = logs["step"]
        for group, lr in logs["lr"].items():
            self.writer.add_scalar(f"lr/{group}", lr, step)
        if logs["loss"] is not None:
            self.writer.add_scalar("train/loss", logs["loss"], step)
        for key, value in logs["speed"].items():
            self.writer.add_scalar(f"speed/{key}", value, step)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"validation/{key}", value, trainer.state.step)
        self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        self.writer.close()


class MLflowLog(Callback):
    """The same scalars as TensorBoardLog, plus the resolved recipe as parameters, into an
    MLflow *local file store* at ``<run>/mlruns`` (``mlflow ui --backend-store-uri
    <run>/mlruns``). A private client: no global MLflow state is touched, nothing leaves
    the machine."""

    def __init__(self, directory: Path, run_name: str, params: dict):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TuneforgeError("output.loggers includes mlflow but the mlflow package is not installed: "
                                 "pip install 'tuneforge[mlflow]' (or remove it from output.loggers)") from None
        import os

        # MLflow 3 refuses its file store unless asked: a local store next to the run, with no
        # server or database to set up, is what this logger is for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=Path(directory).resolve().as_uri())
        experiment = self.client.get_experiment_by_name("tuneforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("tuneforge")
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in sorted(params.items())[:500]:  # MLflow caps a run's parameters
            self.client.log_param(self.run_id, key[:250], str(value)[:500])

    def _metric(self, key: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, key, float(value), step=step)

    def on_log(self, trainer, logs: dict) -> None:
        step = logs["step"]
        for group, lr in logs["lr"].items():
            self._metric(f"lr/{group}", lr, step)
        if logs["loss"] is not None:
            self._metric("train/loss", logs["loss"], step)
        for key, value in logs["speed"].items():
            self._metric(f"speed/{key}", value, step)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._metric(f"validation/{key}", value, trainer.state.step)

    def on_fit_end(self, trainer) -> None:
        self.client.set_terminated(self.run_id, status="KILLED" if trainer.state.interrupted else "FINISHED")


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_loggers(names: list[str], run_path: Path, recipe=None) -> list[Callback]:
    """The loggers named in ``output.loggers``; each logs what the loop's ``on_log`` hands it,
    every ``train.log_every`` steps."""
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardLog(run_path / "tensorboard"))
        elif name == "mlflow":
            params = _flatten(recipe.model_dump(mode="json")) if recipe is not None else {}
            out.append(MLflowLog(run_path / "mlruns", run_path.name, params))
    return out
