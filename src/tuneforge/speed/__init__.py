"""Speed-ups, one shape each (``speed/base.py``): ``applies(job) -> (bool, why)``, ``apply(job)``,
``remove()``. The run calls :func:`apply_speedups` at each stage; every decision, applied or
not, is logged the same way and recorded in the manifest (``speedups``)."""

from __future__ import annotations

from .base import SpeedUp
from .cache import FeatureCache, PrefixCache
from .model import ChannelsLast, Checkpointing, Compile, FastDropout
from .process import FlushDenormals, Threads

# In the order they are decided within a stage. A new speed-up is one class and one entry here.
SPEEDUPS: tuple[type, ...] = (Threads, ChannelsLast, Checkpointing, Compile, FastDropout, FeatureCache, PrefixCache,
                              FlushDenormals)
STAGES = ("start", "model", "data", "train")


def apply_speedups(job, stage: str) -> None:
    """Decide and apply every speed-up of ``stage``; each applied one is undone when the job closes."""
    assert stage in STAGES, stage
    for cls in SPEEDUPS:
        if cls.stage != stage:
            continue
        speedup = cls()
        ok, why = speedup.applies(job)
        if ok:
            speedup.apply(job)
            job.on_exit(speedup.remove)
        elif why:
            job.log(f"{speedup.name} off: {why}")
        if ok or why:
            job.speedups[speedup.name] = {"applied": ok, **({"why": why} if why else {})}


__all__ = ["SPEEDUPS", "STAGES", "SpeedUp", "apply_speedups"]
