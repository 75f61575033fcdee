"""The run directory: everything a run produced, and what it depended on.

    <run>/config.yaml     the resolved recipe (every default filled in)
    <run>/manifest.json   versions, device, seed, data fingerprints, command line, timings
    <run>/metrics.jsonl   one JSON line per log / eval event
    <run>/checkpoints/    best (and periodic) checkpoints
    <run>/model/          the final model, label map and preprocessing
    <run>/eval.json       final metrics (validation, test)
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ..errors import TuneforgeError

RUN_MARKER = "manifest.json"
# What a run writes, so what --overwrite replaces; any other file in the directory is the user's and stays.
RUN_FILES = ("config.yaml", RUN_MARKER, "metrics.jsonl", "eval.json", "report.html", "retain_reference.pt",
             "reproduction.json")
RUN_DIRS = ("checkpoints", "model", "report")
_PACKAGES = ("tuneforge", "torch", "torchvision", "transformers", "peft", "timm", "safetensors",
             "pydantic", "scikit-learn", "torchmetrics", "numpy", "pandas", "pillow")


def is_main_process() -> bool:
    """Rank-aware logging and saving: only rank 0 writes (ready for multi-process runs)."""
    return int(os.environ.get("RANK", "0")) == 0


def default_run_dir(recipe, origin: str | None) -> Path:
    name = recipe.output.name or (Path(origin).stem if origin else "run")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{stamp}"


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if (path / RUN_MARKER).exists() and not overwrite:
            raise TuneforgeError(
                f"output directory '{path}' already holds a run; choose another output.dir, "
                "or pass --overwrite to replace it"
            )
        if not (path / RUN_MARKER).exists() and not overwrite:
            raise TuneforgeError(
                f"output directory '{path}' is not empty and is not a tuneforge run; "
                "choose an empty or new output.dir (or pass --overwrite)"
            )
        # --overwrite replaces the old run's artefacts (never unknown files), so no stale
        # checkpoint or model can be mistaken for this run's.
        import shutil

        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(path / name, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def enclosing_run(path) -> Path | None:
    """The run directory that is ``path`` or holds it (symlinks followed), if any."""
    here = Path(os.path.realpath(path))
    for directory in (here, *here.parents):
        if (directory / RUN_MARKER).is_file():
            return directory
    return None


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
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.path / name)  # atomic: readers never see half a file

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
