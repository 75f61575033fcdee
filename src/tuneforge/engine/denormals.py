"""Flushing subnormal floats to zero on CPU while training (``train.flush_denormal``).

x86 computes with subnormal floats (|x| < 1.2e-38 in fp32) on a slow path. Real images
drive EfficientNet's backward pass into them, and flushing them to zero (the FTZ/DAZ bits)
made a bare training step 15-25% faster on our CPU machine (PERFORMANCE.md).

``torch.set_flush_denormal`` sets those bits for the calling thread only: the intra-op
(OpenMP) threads that already exist, which compute most of a large operation, keep theirs.
So the setting is applied in every thread of the OpenMP team too, by running it inside one
parallel region of the libgomp that torch uses (Linux builds); where that runtime is not
found (macOS, Windows), only the calling thread flushes.

torch has no getter for the setting; :func:`flushed` tells by arithmetic.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch


def flushed() -> bool:
    """Whether the calling thread flushes subnormals now: a subnormal times one is zero only then."""
    return bool((torch.full((1,), 1e-40) * 1.0)[0] == 0)


@functools.lru_cache(maxsize=1)
def _gomp():
    """``GOMP_parallel`` of the libgomp that torch runs its intra-op threads on, or None.

    Other packages bring their own copy with its own threads (scikit-learn's wheel ships
    ``libgomp-<hash>.so``), so the copy is chosen with care: the one in torch's own folder
    (pip wheels), else the one already loaded under the plain name ``libgomp.so.1``."""
    import os

    torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "/libgomp" in line}
        ours = [p for p in loaded if os.path.realpath(p).startswith(torch_dir)]
        if ours:
            lib = ctypes.CDLL(ours[0])
        else:  # torch linked against a libgomp outside its folder (conda, distro builds)
            lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        fn = lib.GOMP_parallel
    except (OSError, AttributeError):
        return None
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    fn.argtypes, fn.restype = [body_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint], None
    return fn, body_type


def set_flush_denormal(on: bool) -> bool:
    """``torch.set_flush_denormal(on)`` in the calling thread and in every intra-op thread;
    False where the CPU cannot flush."""
    threads = torch.get_num_threads()
    gomp = _gomp() if threads > 1 else None
    if gomp is None:
        return torch.set_flush_denormal(on)
    fn, body_type = gomp
    results: list[bool] = []
    body = body_type(lambda _: results.append(torch.set_flush_denormal(on)))  # runs once per thread, this one too
    fn(body, None, threads, 0)
    return bool(results) and all(results)


@contextlib.contextmanager
def flush_denormals(device: torch.device, on: bool = True):
    """Flush subnormals to zero inside the block on CPU, then put the setting back.

    Yields whether flushing is on inside the block. A setting that is on already (the
    caller's own, or an outer block's) is left as it is; one this block turned on is turned
    off again. The run enters it (run/finetune.py) around training and the final
    evaluation; the Trainer itself leaves the setting alone."""
    if not on or device.type != "cpu":
        yield False
        return
    if flushed():
        yield True
        return
    turned_on = set_flush_denormal(True)
    try:
        yield turned_on
    finally:
        if turned_on:
            set_flush_denormal(False)
