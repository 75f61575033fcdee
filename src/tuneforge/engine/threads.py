"""How many intra-op threads a CPU run uses (``train.threads``).

Why: torch starts one OpenMP thread per core and every parallel operation waits for all of
them. When another process keeps a core busy, the thread that lands on it runs late and
the others spin waiting for it: on the project's 2-core machine, tiny training runs took
10-17x longer with 2 threads than with 1 while a second job ran (PERFORMANCE.md). So with
``auto`` (the default) a run looks, for a quarter of a second before it starts, at how much
of the machine other processes use, and takes only the cores that are free.

It leaves the count alone when the user chose one: ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS`` in the environment, a number in ``train.threads``, or torch already set
to one thread. The count in use is recorded in the run's manifest (``torch_threads``) and
restored when ``finetune`` returns.
"""

from __future__ import annotations

import contextlib
import os
import time


def choose(cores: int, other_busy: float) -> int:
    """Threads for ``cores`` when other processes keep ``other_busy`` cores busy: the free
    cores, rounded down unless nearly whole (a core 80% free is taken, one 70% free is not)."""
    return max(1, min(cores, int(cores - other_busy + 0.25)))


def _cpu_ticks() -> tuple[int, int, int]:
    """(all CPUs' busy ticks, all ticks, this process's ticks) from /proc."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return total - idle, total, int(own[11]) + int(own[12])  # utime + stime


def other_busy_cores(seconds: float = 0.25) -> float | None:
    """Cores kept busy by other processes over ``seconds``; None where /proc cannot say (not
    Linux, or a CPU set smaller than the machine's, where the machine-wide figure misleads)."""
    try:
        with open("/proc/stat") as f:
            n_cpus = sum(1 for line in f if line.startswith("cpu") and line[3].isdigit())
        if n_cpus != len(os.sched_getaffinity(0)):
            return None
        busy0, total0, own0 = _cpu_ticks()
        time.sleep(seconds)
        busy1, total1, own1 = _cpu_ticks()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    elapsed = (total1 - total0) / n_cpus  # ticks per CPU
    if elapsed <= 0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed


@contextlib.contextmanager
def intra_op_threads(setting, device, log):
    """Set torch's intra-op thread count for a run (see the module docstring); restore it after."""
    import torch

    before = torch.get_num_threads()
    chosen = None
    if device.type == "cpu":
        if setting != "auto":
            chosen = int(setting)
        elif before > 1 and not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
            busy = other_busy_cores()
            free = choose(before, busy) if busy is not None else before
            if free < before:
                chosen = free
                log(f"threads: {chosen} of {before}: other processes keep {busy:.1f} cores busy, and threads that "
                    "wait for a descheduled peer make training several times slower (train.threads sets the count)")
    if chosen is not None and chosen != before:
        torch.set_num_threads(chosen)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
