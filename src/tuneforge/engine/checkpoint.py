"""Checkpoints: what trains, written atomically.

A checkpoint holds the *trainable* state (parameters with requires_grad plus
buffers such as BatchNorm statistics), so a linear probe's checkpoint is the
size of its head, not of the backbone. Files are written to a temporary name,
fsynced, then renamed, so a crash never leaves a half-written checkpoint under
a real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    # state_dict() leaves out non-persistent buffers (e.g. BERT's position_ids).
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint holds keys this model lacks: {unexpected[:5]}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every filesystem supports directory fsync


def save_checkpoint(directory: Path, model: torch.nn.Module, *, optimizer=None, scheduler=None, meta: dict) -> Path:
    """Write ``directory`` atomically: build it as ``.<name>.tmp``, then rename."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None},
                   tmp / "optimizer.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint_weights(directory: Path, model: torch.nn.Module) -> dict:
    load_trainable_state(model, load_file(str(Path(directory) / "trainable.safetensors")))
    return json.loads((Path(directory) / "meta.json").read_text())
