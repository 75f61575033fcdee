"""Speed-ups that set process state for the run and put it back: intra-op threads, denormals."""

from __future__ import annotations

import contextlib


class _Scoped:
    """A speed-up that is a context manager entered by ``apply`` and left by ``remove``."""

    def __init__(self):
        self._stack = contextlib.ExitStack()

    def remove(self) -> None:
        self._stack.close()


class Threads(_Scoped):
    """``train.threads``: only the cores other processes leave free (``engine/threads.py`` says why)."""

    name, stage = "threads", "start"

    def applies(self, job) -> tuple[bool, str]:
        return job.device.type == "cpu", ""

    def apply(self, job) -> None:
        from ..engine.threads import intra_op_threads

        self._stack.enter_context(intra_op_threads(job.cfg.threads, job.device, job.log))


class FlushDenormals(_Scoped):
    """``train.flush_denormal``: subnormal floats flushed to zero on CPU while training and in the
    final evaluation (``engine/denormals.py`` says why)."""

    name, stage = "denormals", "train"

    def applies(self, job) -> tuple[bool, str]:
        return job.cfg.flush_denormal and job.device.type == "cpu", ""

    def apply(self, job) -> None:
        from ..engine.denormals import flush_denormals

        self._stack.enter_context(flush_denormals(job.device, True))
        job.log("denormals: flushed to zero while training and evaluating (train.flush_denormal)")
