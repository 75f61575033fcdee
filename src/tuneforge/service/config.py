"""The service's settings: one object the server and every worker build from the same flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TuneforgeError


@dataclass
class ServiceConfig:
    data_dir: Path = Path("tuneforge-service")  # files, jobs (each an ordinary run directory), the SQLite database
    db: str | None = None                 # database URL; default sqlite:///<data_dir>/service.db
    models: dict[str, str] = field(default_factory=dict)  # name a client asks for -> the recipe's model.name
    max_upload_bytes: int = 256 << 20      # one uploaded file
    max_rows: int = 1_000_000              # examples in one uploaded file
    max_concurrent: int | None = None      # jobs running at once over all workers (None: one per worker)
    heartbeat_s: float = 1.0               # how often a worker says it is alive (and reads cancel/pause)
    stale_after_s: float = 15.0            # a running job whose worker is silent this long is queued again
    poll_s: float = 0.5                    # an idle worker looks for work this often
    checkpoint_every: int = 10             # train.save_every of service jobs: what a killed worker loses at most
    max_loaded_models: int = 2             # fine-tuned models kept in memory for inference

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'service.db'}"

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def inside(self, path: str | Path) -> bool:
        """Whether ``path`` (symlinks followed) lies inside the data directory."""
        real = Path(os.path.realpath(path))
        return real == self.data_dir or self.data_dir in real.parents


def parse_models(values: list[str] | None) -> dict[str, str]:
    """``--model NAME=MODEL`` flags -> {NAME: MODEL}: MODEL is what a recipe's model.name takes (an
    alias, a local Hugging Face directory). The built-in aliases (`tuneforge models`) are always
    offered under their own names."""
    from ..models.aliases import ALIASES

    models = {name: name for name in ALIASES}
    for value in values or ():
        name, sep, target = value.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise TuneforgeError(f"--model {value!r}: give NAME=MODEL, e.g. --model smollm2-135m=/models/smollm2-135m-hf")
        if ":" in name:
            raise TuneforgeError(f"--model {value!r}: a model name cannot hold ':' (fine-tuned models are named "
                                 "ft:BASE:SUFFIX:JOB)")
        models[name.strip()] = target.strip()
    return models
