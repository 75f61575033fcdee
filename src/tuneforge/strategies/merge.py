"""Fold a LoRA / IA3 update into the base weights, and prove it changed nothing.

``merge_and_check`` is what ``output.merge`` runs before saving, and what an exporter
calls: the merged model must give the unmerged model's logits on real inputs within a
stated tolerance, or it is an error (a silent drift in an exported model is the worst
kind of bug). Merging itself is peft's ``merge_and_unload`` (exact algebra for LoRA,
DoRA and IA3; the difference left is float rounding). Rounding grows with the size of the
logits, so the tolerance applies to ``max|merged - unmerged| / max(1, max|unmerged|)``:
absolute for ordinary logits, relative for large ones (random tiny CNNs reach 1e4).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TuneforgeError


@torch.no_grad()
def merge_and_check(model: nn.Module, inputs: dict, tolerance: float) -> tuple[nn.Module, dict]:
    """-> (the merged plain model, report). ``inputs``: model keyword inputs. The report holds
    ``max_abs_logit_diff``, ``logit_scale`` (max(1, max|unmerged|)), ``scaled_diff`` (their ratio,
    compared with ``tolerance``), ``tolerance`` and ``examples``."""
    if not hasattr(model, "merge_and_unload"):
        raise TuneforgeError("nothing to merge: the model carries no LoRA/IA3 adapter (output.merge needs "
                             "strategy lora or ia3)")
    was_training = model.training
    model.eval()  # no dropout: the comparison is deterministic
    before = model(**inputs).float()  # (B, C)
    merged = model.merge_and_unload()
    merged.eval()
    after = merged(**inputs).float()  # (B, C)
    diff = (after - before).abs().max().item() if before.numel() else 0.0
    scale = max(1.0, before.abs().max().item() if before.numel() else 1.0)
    report = {"max_abs_logit_diff": diff, "logit_scale": scale, "scaled_diff": diff / scale,
              "tolerance": tolerance, "examples": int(before.shape[0])}
    if not diff / scale <= tolerance:  # also catches NaN
        raise TuneforgeError(f"merging changed the model's outputs: max |merged - unmerged| logit = {diff:.3g} "
                             f"(logits up to {scale:.3g}, scaled {diff / scale:.3g}) > output.merge_tolerance "
                             f"{tolerance:g}; keep the unmerged adapter (output.merge: false)")
    merged.train(was_training)
    return merged, report
