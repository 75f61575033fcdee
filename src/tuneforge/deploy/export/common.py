"""What every exporter shares: the sample inputs of the parity check, the comparison, the
traceable wrapper, publishing a checked export, and the plain (merged) model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ...errors import TuneforgeError
from ...modalities import modality_of

TOLERANCE = 1e-4  # fp32 exports: max |logit difference| / max(1, max |logit|)
INT8_MIN_AGREEMENT = 0.9  # dynamic int8: share of sample predictions that must keep their label
MARKER = "export.json"  # every export directory holds its parity report under this name


class _Logits(nn.Module):
    """Plain tensors in, logits out: the signature an exporter can trace."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)))


def sample_inputs(run_dir: Path, task, n: int) -> tuple[dict, list | None, str]:
    """Up to ``n`` encoded inputs from the run's own data (validation first), their label
    ids when known, and a line saying where they came from.

    The files are read with the run's own column mapping (its ``config.yaml``), not the saved
    task's: a loaded task knows its task settings but not the run's data section, so it would
    look for the default columns and, not finding them in (say) SST-2's ``sentence``, leave
    the check to random tokens."""
    from ...recipe import from_run_config

    config = run_dir / "config.yaml"
    modality = modality_of(task.modality)
    if config.exists():
        found = task.sample_inputs(from_run_config(config).data, n)  # runs of any version, old task blocks included
        if found is not None:
            return found
    g = torch.Generator().manual_seed(0)
    return (modality.synthetic(task, 4, g), None,
            f"4 synthetic {'token sequences' if modality.variable_length else 'inputs'} (the run's data is gone)")


def plain_model(model: nn.Module, meta: dict) -> nn.Module:
    """A model whose weights are all ordinary parameters of the base architecture + head."""
    from ...strategies import strategy_class
    from ...strategies.base import merged_module

    strategy = strategy_class(meta["strategy"])
    if not strategy.plain_export:
        raise TuneforgeError(f"strategy {meta['strategy']} keeps modules or virtual tokens outside the base "
                             "architecture; this format writes the plain architecture — use --format onnx (it runs "
                             "any strategy's graph)")
    return merged_module(model) if strategy.mergeable else model


def publish(tmp: Path, out: Path, report: dict) -> None:
    """Write the report next to the checked export, then move the whole directory into place.
    Only an earlier export (it holds ``MARKER``) or an empty directory is ever replaced."""
    (tmp / MARKER).write_text(json.dumps(report, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise TuneforgeError(f"{out} is not an earlier export (no {MARKER}); it was left as it is")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)  # the earlier export goes only once the new one is in place
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    tmp.replace(out)


def compare(reference: torch.Tensor, got: torch.Tensor, tolerance: float | None, min_agreement: float) -> dict:
    diff = float((got - reference).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    agreement = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    ok = agreement >= min_agreement and (tolerance is None or diff <= tolerance * scale)
    rule = (f"|diff| <= {tolerance:g} x max(1, |logit|) and every label equal" if tolerance is not None
            else f"labels agree on >= {min_agreement:.0%}")
    return {"max_abs_diff": diff, "logit_scale": scale, "label_agreement": agreement, "rule": rule,
            "check": "passed" if ok else "FAILED"}


def fail(report: dict, what: str) -> None:
    if report["check"] != "passed":
        raise TuneforgeError(f"{what} parity check failed: max |logit diff| {report['max_abs_diff']:.3g}, labels agree "
                             f"{report['label_agreement']:.1%} (rule: {report['rule']}); nothing was written")


