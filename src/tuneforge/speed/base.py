"""The one shape of a speed-up.

A speed-up makes a run faster (or leaner) without changing what it computes beyond float
rounding. Each is a small class with three methods, and the run treats them all alike::

    ok, why = speedup.applies(job)   # decided from the job's facts; `why` says why not
    if ok:
        speedup.apply(job)           # may change the model, the loaders, process settings
        job.on_exit(speedup.remove)  # undone when the run ends, however it ends

``stage`` says when in the run it is decided: ``"start"`` (before any data or model: process
settings such as threads), ``"model"`` (after the strategy is applied and the model is on
its device), ``"data"`` (after the datasets and plain loaders exist: caches replace loaders),
``"train"`` (around training and the final evaluation only).

``why`` is empty when the speed-up has nothing to say (its recipe switch is off, or it is
not for this kind of run); otherwise it is logged as ``<name> off: <why>`` and recorded in
the manifest (``speedups``), like every decision of the run.

A speed-up reads only these job fields: ``recipe``, ``device``, ``amp_dtype``, ``task``
(its declared capabilities), ``strategy`` (its declared capabilities), ``loaded.info``,
``model``, ``datasets``, ``loaders``, ``labels``, ``log`` and ``autocast()``; and writes only
``model`` (in place), ``loaders`` and ``batch_layout``. It imports nothing from the run.
"""

from __future__ import annotations

from typing import Protocol


class SpeedUp(Protocol):
    name: str   # as in the manifest and the log: "fast dropout", "feature cache", ...
    stage: str  # "start" | "model" | "data" | "train"

    def applies(self, job) -> tuple[bool, str]:
        """Whether it applies to this run, and (when not) why — empty when nothing needs saying."""

    def apply(self, job) -> None:
        """Make the change; log what it did in one line."""

    def remove(self) -> None:
        """Undo what ``apply`` changed outside the run's own objects (process state, patched forwards)."""
