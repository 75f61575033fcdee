"""Checkpoints: written atomically, verified by checksum, enough to resume exactly.

A checkpoint directory holds
    trainable.safetensors  parameters with requires_grad, plus buffers (BatchNorm statistics):
                           a linear probe's checkpoint is the size of its head, not the backbone
    optimizer.pt           optimizer, scheduler and gradient-scaler state (resumable checkpoints)
    rng.pt                 every RNG state: torch CPU/CUDA, NumPy, Python (resumable checkpoints)
    meta.json              step, trainer and callback state, and the sha256 of every file above

It is built as ``.<name>.tmp``, each file fsynced, then renamed into place, so a
crash, a SIGKILL or a full disk never leaves a half-written checkpoint under a
real name; the previous checkpoint stays intact until the new one is complete.
``meta.json`` is written last: a directory without a readable one, or whose
checksums disagree, is reported and skipped on resume, and every load checks them
first (a damaged ``best`` is replaced by the periodic checkpoint of the same step, or
the run fails): damaged weights are never loaded silently. Whatever stops a write
(a full disk reads as ``OSError``, or as torch's and safetensors' own errors), the
partial copy is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TuneforgeError

META = "meta.json"


class CheckpointWriteError(TuneforgeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name  # the checkpoint that could not be written


class CheckpointCorrupt(TuneforgeError):
    """A checkpoint the run was about to load does not match its recorded sha256."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# How a full disk reads when a library reports it in its own words: torch.save ("PytorchStreamWriter
# failed writing file ... file write failed"), safetensors ("IoError(Os { code: 28, kind: StorageFull"))
_FULL_TEXT = ("no space left", "file write failed", "storagefull", "disk quota", "os error 28", "code: 28")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) says the disk or the quota is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CheckpointWriteError) and "disk full" in str(err):
            return True
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if isinstance(err, (RuntimeError, OSError)) and any(t in str(err).lower() for t in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def trainable_state(model: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """``names``: the parameters that may train (the optimizer's); default those with requires_grad.
    A strategy that unfreezes later (gradual-unfreeze) needs the former: a checkpoint taken while a
    group is still frozen must still hold it, or restoring the best weights would mix steps."""
    keep = set(names) if names is not None else {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    # state_dict() leaves out non-persistent buffers (e.g. BERT's position_ids).
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise TuneforgeError(f"checkpoint holds weights this model lacks ({', '.join(unexpected[:5])}); "
                             "was it written by a different recipe?")


# --------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- writing

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every filesystem supports fsync on directories


def save_checkpoint(directory: Path, model: torch.nn.Module, *, optimizer=None, scheduler=None, scaler=None,
                    meta: dict, with_rng: bool = False, names: set[str] | None = None) -> Path:
    """Write ``directory`` atomically; on failure remove the partial copy and raise CheckpointWriteError."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model, names), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        if with_rng:
            torch.save(rng_state(), tmp / "rng.pt")
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        meta = {**meta, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        _fsync(tmp / META)
    except BaseException as err:
        # Whatever stopped the write (a full disk reads as OSError, or as torch's and safetensors'
        # own errors), the partial copy goes: left behind, it kept a full disk full.
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise CheckpointWriteError(
                f"disk full: could not write checkpoint '{directory.name}' (No space left on device); the previous "
                f"checkpoints in {directory.parent} are intact — free disk space and resume with --resume",
                directory.name) from None
        if isinstance(err, OSError):
            raise CheckpointWriteError(
                f"could not write checkpoint '{directory.name}' ({err.strerror or err}); the previous checkpoints "
                f"in {directory.parent} are intact — fix the permissions (or free disk space) and resume with --resume",
                directory.name) from None
        raise
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


# --------------------------------------------------------------------------- reading

def verify_checkpoint(directory: Path) -> str | None:
    """None if the checkpoint is complete and its checksums match, else the reason it is not."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError) as err:
        return f"{META} missing or unreadable ({err.__class__.__name__})"
    for name, digest in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its recorded sha256 (truncated or corrupted)"
    return None


def newest_valid(checkpoints: Path, resumable: bool = True, report=print) -> Path | None:
    """The newest periodic checkpoint that verifies; corrupt ones are reported and skipped."""
    candidates = sorted(Path(checkpoints).glob("step-*"), reverse=True) if Path(checkpoints).is_dir() else []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None and (not resumable or (path / "rng.pt").exists()):
            return path
        report(f"skipping checkpoint {path.name}: {problem or 'not resumable'}")
    return None


def recover(checkpoints: Path, keep_up_to: Path | None, report=print) -> None:
    """Tidy a run that died mid-write, before resuming from ``keep_up_to``:
    a rewrite killed between its two renames left the complete previous copy as
    ``.NAME.old``: put it back; partial ``.NAME.tmp`` copies are deleted; periodic
    checkpoints newer than the one resumed from (corrupt, or from the abandoned
    future) are removed so pruning never keeps them instead of good ones."""
    checkpoints = Path(checkpoints)
    for old in checkpoints.glob(".*.old"):
        real = checkpoints / old.name[1:-4]
        if not real.exists():
            old.rename(real)
            report(f"restored {real.name} (a rewrite of it was interrupted)")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in checkpoints.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_up_to is not None:
        for path in checkpoints.glob("step-*"):
            if path.name > keep_up_to.name:
                shutil.rmtree(path, ignore_errors=True)
                report(f"removed {path.name}: newer than {keep_up_to.name}, which the run resumes from")


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def check_intact(directory: Path) -> None:
    """Raise :class:`CheckpointCorrupt` unless every file of ``directory`` matches its recorded sha256."""
    problem = verify_checkpoint(directory)
    if problem is not None:
        raise CheckpointCorrupt(f"checkpoint {directory} is damaged: {problem}; its weights were not loaded")


def load_checkpoint_weights(directory: Path, model: torch.nn.Module) -> dict:
    """Load the checkpoint's weights into ``model`` after checking every recorded sha256: a
    damaged checkpoint is never loaded silently."""
    check_intact(directory)
    load_trainable_state(model, load_file(str(Path(directory) / "trainable.safetensors")))
    return read_meta(directory)


def load_best_weights(checkpoints: Path, model: torch.nn.Module, report=print) -> dict:
    """``checkpoints/best`` into ``model``. If it is damaged, the periodic checkpoint of the same
    step holds the same weights: loaded instead, and said loudly; without one the run fails."""
    best = Path(checkpoints) / "best"
    try:
        return load_checkpoint_weights(best, model)
    except CheckpointCorrupt as err:
        try:
            step = read_meta(best)["step"]
        except (OSError, ValueError, KeyError):
            step = None
        twin = Path(checkpoints) / f"step-{step:08d}" if isinstance(step, int) else None
        if twin is not None and twin.is_dir() and verify_checkpoint(twin) is None:
            report(f"[bold red]{err}[/] — loaded the same step's weights from {twin.name} instead")
            return load_checkpoint_weights(twin, model)
        raise CheckpointCorrupt(f"{err}, and no intact checkpoint of the same step is left; the final model was "
                                f"not saved — train again (with --overwrite), or keep more periodic checkpoints "
                                "(train.keep_checkpoints) so a damaged best can be replaced") from None


def load_resumable(directory: Path, model, optimizer, scheduler, scaler) -> dict:
    """Restore weights and optimizer/scheduler/scaler; returns meta. RNG is restored separately
    (``restore_rng``), right before the loop starts, so nothing in between consumes it."""
    meta = load_checkpoint_weights(directory, model)
    state = torch.load(Path(directory) / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return meta


def restore_rng(directory: Path) -> None:
    set_rng_state(torch.load(Path(directory) / "rng.pt", map_location="cpu", weights_only=True))
