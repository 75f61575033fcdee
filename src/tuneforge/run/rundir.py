"""The run directory: everything a run produced, and what it depended on.

    <run>/config.yaml     the resolved recipe (every default filled in)
    <run>/manifest.json   versions, device, seed, data fingerprints, command line, timings
    <run>/metrics.jsonl   one JSON line per log / eval event
    <run>/checkpoints/    best (and periodic) checkpoints
    <run>/model/          the final model, label map and preprocessing
    <run>/eval.json       final metrics (validation, test)
    <run>/.lock           while a process trains in it: that process's pid, host and command

One process at a time: a run directory is locked (:class:`RunLock`) from the moment a run
or a resume chooses it until that process ends, however it ends. ``--overwrite`` never
deletes a run before its replacement is worth something: the old run's files are set aside
in ``<run>.previous`` and dropped when the new run writes its first checkpoint (put back if
it fails before that; a run killed before that leaves both, and says so on the next look).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ..errors import TuneforgeError
from .lock import LOCK, RunBusy, RunLock, describe_holder, lock_holder  # noqa: F401 - re-exported

RUN_MARKER = "manifest.json"
_PACKAGES = ("tuneforge", "torch", "torchvision", "transformers", "peft", "timm", "safetensors",
             "pydantic", "scikit-learn", "torchmetrics", "numpy", "pandas", "pillow")


def is_main_process() -> bool:
    """Rank-aware logging and saving: only rank 0 writes (ready for multi-process runs)."""
    return int(os.environ.get("RANK", "0")) == 0


def default_run_dir(recipe, origin: str | None) -> Path:
    name = recipe.output.name or (Path(origin).stem if origin else "run")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{stamp}"


PREVIOUS_MARK = ".tuneforge-previous"  # inside <run>.previous: whose files these are, and whether all moved
INTERRUPTED = "interrupted (process gone)"
# What a run writes, so what --overwrite replaces; any other file in the directory is the user's and stays.
RUN_FILES = ("config.yaml", RUN_MARKER, "metrics.jsonl", "eval.json", "report.html", "retain_reference.pt",
             "reproduction.json")
RUN_DIRS = ("checkpoints", "model", "report")


# --------------------------------------------------------------------------- reading a run

def read_manifest(path) -> dict:
    """``<run>/manifest.json``; a missing or damaged one is an error that says what to do."""
    file = Path(path) / RUN_MARKER
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TuneforgeError(f"{path} is not a tuneforge run directory (no {RUN_MARKER}); pass the directory "
                             "printed by `tuneforge train`") from None
    except (OSError, ValueError) as err:
        raise TuneforgeError(f"{file} is damaged ({type(err).__name__}: {str(err)[:120]}); restore it from a copy "
                             f"of the run — or train again with --overwrite (its model, if saved, is in "
                             f"{Path(path) / 'model'})") from None
    if not isinstance(data, dict):
        raise TuneforgeError(f"{file} is damaged (not a JSON object); restore it from a copy of the run")
    return data


def run_status(path, manifest: dict | None = None) -> str:
    """The manifest's status, except that a run whose process is gone says so: a run killed
    outright (SIGKILL, a power cut) never got to record how it ended."""
    manifest = read_manifest(path) if manifest is None else manifest
    status = str(manifest.get("status") or "unknown")
    if status == "running" and manifest.get("pid") is not None and lock_holder(path) is None:
        return INTERRUPTED
    return status


def enclosing_run(path) -> Path | None:
    """The run directory that is ``path`` or holds it (symlinks followed), if any."""
    here = Path(os.path.realpath(path))
    for directory in (here, *here.parents):
        if (directory / RUN_MARKER).is_file():
            return directory
    return None


# --------------------------------------------------------------------------- a new run's directory

def previous_of(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".previous")


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an output directory that a new run may not use. Reads only: it runs before the
    model loads, and again under the directory's lock (two runs started at the same instant)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TuneforgeError(f"output directory '{path}' is a file; set output.dir to a directory")
    owner = enclosing_run(Path(os.path.realpath(path)).parent)
    if owner is not None:
        raise TuneforgeError(f"output directory '{path}' is inside the run {owner}; a run directory holds one run "
                             "— choose an output.dir outside it")
    if not (path.is_dir() and any(p.name != LOCK for p in path.iterdir())):
        return
    if (path / RUN_MARKER).exists():
        if not overwrite:
            try:
                status = run_status(path)
            except TuneforgeError:
                status = "its manifest.json is damaged"
            resume = (f"; or continue it with `tuneforge train --resume {path}`"
                      if status in ("interrupted", INTERRUPTED, "failed") else "")
            raise TuneforgeError(f"output directory '{path}' already holds a run ({status}); choose another "
                                 f"output.dir, or pass --overwrite to replace it{resume}")
    elif not overwrite:
        raise TuneforgeError(f"output directory '{path}' is not empty and is not a tuneforge run; "
                             "choose an empty or new output.dir (or pass --overwrite)")
    backup = previous_of(path)
    if backup.exists() and not (backup / PREVIOUS_MARK).is_file():
        raise TuneforgeError(f"--overwrite sets the old run aside in {backup} until the new one has a checkpoint, "
                             f"but {backup} exists and is not such a copy; move it away first")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _has_checkpoint(path: Path) -> bool:
    checkpoints = Path(path) / "checkpoints"
    return checkpoints.is_dir() and any(p.name == "best" or p.name.startswith("step-") for p in checkpoints.iterdir())


def prepare_run_dir(path: Path, overwrite: bool, log=None) -> Path:
    """Make ``path`` (whose lock this process holds) ready for a new run. With ``--overwrite``
    the old run's files are moved into ``<run>.previous`` (:func:`previous_of`) rather than
    deleted; files that are not a run's stay where they are."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    found = [n for n in (*RUN_FILES, *RUN_DIRS) if (path / n).exists() or (path / n).is_symlink()]
    if not found:
        return path
    log = log or (lambda message: None)
    backup, mark = previous_of(path), previous_of(path) / PREVIOUS_MARK
    if backup.exists():
        state = json.loads(mark.read_text() or "{}")
        if state.get("complete") and not _has_checkpoint(path):
            # the replacement of an earlier --overwrite, killed before its first checkpoint: worth nothing
            for name in found:
                _remove(path / name)
            log(f"--overwrite: removed an unfinished run without a checkpoint; the run before it stays in {backup} "
                "until this one writes its first checkpoint")
            return path
        if state.get("complete"):
            shutil.rmtree(backup)  # the run here got further than the copy: it is the one to keep
    if not backup.exists():
        backup.mkdir()
        mark.write_text(json.dumps({"of": str(path), "complete": False}))
    for name in found:  # an incomplete copy (a move killed half way) is completed first
        if not (backup / name).exists():
            (path / name).rename(backup / name)
        else:
            _remove(path / name)
    mark.write_text(json.dumps({"of": str(path), "complete": True,
                                "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    log(f"--overwrite: the old run is set aside in {backup} until this run writes its first checkpoint")
    return path


def drop_previous(path: Path, backup: Path | None) -> bool:
    """Delete the run --overwrite set aside once the new run in ``path`` has a checkpoint."""
    if backup is not None and backup.exists() and _has_checkpoint(path):
        shutil.rmtree(backup, ignore_errors=True)
        return True
    return False


def settle_previous(path: Path, backup: Path | None, log=None) -> None:
    """The run --overwrite set aside goes once the new run has a checkpoint; before that, if the
    new run ends (fails, stops), the old one comes back."""
    if backup is None or not backup.exists():
        return
    log = log or (lambda message: None)
    if drop_previous(path, backup):
        return
    for name in (*RUN_FILES, *RUN_DIRS):
        if (path / name).exists() or (path / name).is_symlink():
            _remove(path / name)
    for item in backup.iterdir():
        if item.name != PREVIOUS_MARK:
            item.rename(path / item.name)
    shutil.rmtree(backup, ignore_errors=True)
    log(f"the run that --overwrite would have replaced is back in {path} (this run ended before its first checkpoint)")

def process_record() -> dict:
    """Who writes the run now: with the lock, how a later look tells a live run from a killed one."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def package_versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info(device) -> dict:
    import torch

    info = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0], "machine": platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.started = time.time()
        self.manifest: dict = {}
        self.lock: RunLock | None = None   # held from the stage that chose this directory to the run's end
        self.previous: Path | None = None  # the run --overwrite set aside, until this one has a checkpoint

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def write_json(self, name: str, data: dict) -> None:
        if not is_main_process():
            return
        tmp = self.path / f".{name}.tmp"
        try:
            tmp.write_text(json.dumps(data, indent=2, default=str))
            tmp.replace(self.path / name)  # atomic: readers never see half a file
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written copy
            raise

    def write_recipe(self, recipe) -> None:
        if is_main_process():
            (self.path / "config.yaml").write_text(yaml.safe_dump(recipe.dump(), sort_keys=False))

    def start_manifest(self, recipe, argv: list[str] | None, device, precision: str) -> None:
        self.manifest = {
            "tuneforge_run": 1,
            "status": "running",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": argv if argv is not None else sys.argv,
            "cwd": os.getcwd(),
            **process_record(),
            "seed": recipe.train.seed,
            "precision": precision,
            "packages": package_versions(),
            "environment": device_info(device),
            "data": {},
        }
        self.write_json(RUN_MARKER, self.manifest)

    def load_manifest(self) -> dict:
        self.manifest = read_manifest(self.path)
        return self.manifest

    def update_manifest(self, **fields) -> None:
        self.manifest.update(fields)
        self.write_json(RUN_MARKER, self.manifest)
