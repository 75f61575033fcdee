"""Floor 2: one run. ``finetune`` (the algorithm box) assembles a :class:`~tuneforge.run.job.Job`
from a recipe, trains it and finishes it; the run directory, resume, provenance and the saved
model (``artifact``) are its parts. Nothing here imports ``deploy`` or ``workflows``."""

from .rundir import (RUN_MARKER, RunBusy, RunDir, RunLock, default_run_dir, device_info, is_main_process, lock_holder,
                     package_versions, prepare_run_dir, run_status)

__all__ = ["RUN_MARKER", "RunBusy", "RunDir", "RunLock", "default_run_dir", "device_info", "is_main_process",
           "lock_holder", "package_versions", "prepare_run_dir", "run_status"]
