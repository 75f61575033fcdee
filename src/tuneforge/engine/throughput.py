"""Honest speed figures: throughput, padding, peak memory and model-FLOPs utilisation.

FLOPs are *counted*, not estimated from a formula: one forward+backward of a
real batch runs under ``torch.utils.flop_counter.FlopCounterMode``, so frozen
layers (no weight gradients), LoRA (small extra matmuls) and attention count
exactly the work done. MFU divides the achieved FLOP/s by the peak matmul
FLOP/s measured on the same machine in the same precision.
"""

from __future__ import annotations

import resource
import time

import torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def speed(seconds: float, examples: int, tokens: int, positions: int) -> dict:
    """Throughput over an interval (or the whole run); token figures for text only. MFU is
    added by the ``MFU`` callback (engine/mfu.py), which measured its two halves."""
    out = {"samples_per_s": round(examples / max(seconds, 1e-9), 2)}
    if positions:
        out["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
        out["padding_fraction"] = round(1 - tokens / positions, 4)
    return out


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul, best of ``repeats``: the yardstick for MFU.

    Measured afresh each run (well under a second), never cached: a figure taken
    while the machine was busy would inflate every later MFU.
    """
    g = torch.Generator().manual_seed(0)  # private: measuring must not move the training RNG
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """Each gradient of a convolution costs what its forward costs. torch's own formula
    (2.14) ignores ``groups`` and counts a depthwise convolution's backward as dense,
    which inflated EfficientNet's training FLOPs ~40x; the forward formula uses the
    grouped weight shape and is right."""
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_train_flops(model, task, batch: dict, autocast) -> float:
    """FLOPs of one training micro-batch (forward + backward), counted on a real batch.

    Runs in eval mode (BatchNorm statistics untouched; dropout does not change the
    FLOP count) with the RNG forked, then drops the gradients: training itself is
    unaffected, which keeps resumed runs bit-identical.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    # Saved and restored by hand: torch.random.fork_rng does not restore the state
    # when a FlopCounterMode is active inside it (seen with torch 2.14).
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            with autocast():
                out = task.forward(model, batch)
            out["loss_sum"].backward()  # a sum or a mean: the same matmuls
        return float(counter.get_total_flops())
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
