"""Model-FLOPs utilisation, as a callback: the figure is measured around the loop, not in it.

MFU = (training FLOPs per unit x units per second) / the machine's matmul peak, with units
real tokens for text and examples for images. Both halves are measured on this machine in
this run's precision (engine/throughput.py: FLOPs counted on one real batch, the peak timed
on a large matmul). The figure reaches every ``metrics.jsonl`` training line (``mfu``, added
to ``on_log``'s speed figures before MetricsLog writes them) and the manifest's ``timings``
(``mfu``, ``matmul_peak_flops``, ``train_flops_per_token`` / ``_example``) through
:meth:`MFU.figures`.
"""

from __future__ import annotations

import torch

from . import throughput  # looked up at call time: tests swap in a smaller matmul peak
from .callbacks import MEASURE, Callback


class MFU(Callback):
    order = MEASURE  # first: the peak must be timed before anything else starts working

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32):
        self.device, self.dtype = device, dtype  # dtype: the autocast precision (fp32 without autocast)
        self.flops_per_unit: float | None = None  # per real token (text) or per example (images)
        self.peak_flops: float | None = None

    def on_fit_start(self, trainer) -> None:
        try:
            # The peak first, before the training loader's workers start: once a worker is
            # decoding images beside it, a 2-core machine measured a peak 14x too low (and an
            # EfficientNet MFU of 56%).
            self.peak_flops = throughput.measure_matmul_peak(self.device, self.dtype)
            batch = next(iter(trainer.train_loader))
            units = int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
            flops = throughput.count_train_flops(trainer.model, trainer.task, trainer.to_device(batch), trainer.autocast)
            self.flops_per_unit = flops / units
        except Exception:  # a figure we cannot measure is left out, never guessed
            self.flops_per_unit = self.peak_flops = None

    def remeasure_peak(self) -> None:
        """Measure the peak again after training and keep the higher figure: a peak caught in a
        busy moment would flatter the run's MFU, a second look makes that less likely. The run
        calls it after training, outside the timed part."""
        if self.peak_flops:
            try:
                self.peak_flops = max(self.peak_flops, throughput.measure_matmul_peak(self.device, self.dtype))
            except Exception:
                pass

    def figures(self, seconds: float, examples: int, tokens: int, positions: int) -> dict:
        """``{"mfu": ...}`` over an interval (or the whole run), or ``{}`` where it was not measured."""
        if not (self.flops_per_unit and self.peak_flops):
            return {}
        units = tokens if positions else examples
        # 4 significant digits: tiny models too
        return {"mfu": float(f"{self.flops_per_unit * units / max(seconds, 1e-9) / self.peak_flops:.4g}")}

    def on_log(self, trainer, logs: dict) -> None:
        logs["speed"].update(self.figures(**logs["interval"]))
