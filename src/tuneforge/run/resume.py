"""Two ways to continue from an earlier run, and they are different verbs:

- **resume** (``--resume RUN_DIR`` / ``--resume auto``): the *same* run continues
  exactly from its newest valid checkpoint — weights, optimizer, schedule,
  gradient scaler, every RNG, the position in the data order and the callbacks'
  state — so it ends as if it had never stopped. The recipe and data must be the
  ones the run started with; ``tuneforge train --resume RUN_DIR`` needs no recipe (it
  reads the run's own ``config.yaml``). A completed run has nothing to resume; a run a live
  process is training is refused (its directory is locked), and ``auto`` passes it by.
- **warm start** (``--init-from RUN_DIR``): a *new* run whose model starts from
  another run's final weights; optimizer, schedule and data order start fresh,
  and any recipe may be used.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import TuneforgeError
from .rundir import INTERRUPTED, RUN_MARKER, previous_of, read_manifest, run_status

# Keys that may differ between a run and its resumption (they do not change the result).
_FREE = ("output.", "train.progress")


def _flatten(data, prefix=""):
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def find_run_to_resume(spec: str, recipe, origin: str | None) -> Path:
    """``spec`` is a run directory or ``auto``: the newest unfinished run of this recipe (its
    output.dir, or the newest ``runs/<name>-*``) that no live process is training."""
    if spec != "auto":
        path = Path(spec)
        if not (path / RUN_MARKER).exists():
            raise TuneforgeError(f"--resume {spec}: not a tuneforge run directory (no {RUN_MARKER}); "
                                 "pass the directory printed when the run started, or --resume auto")
        return path
    if recipe.output.dir:
        candidates = [Path(recipe.output.dir)]
    else:
        name = recipe.output.name or (Path(origin).stem if origin else "run")
        candidates = sorted(Path("runs").glob(f"{name}-*"), reverse=True)
    seen = []
    for path in candidates:
        try:
            status = run_status(path)
        except TuneforgeError:
            continue
        seen.append(f"{path} ({status})")
        if status not in ("completed", "running"):  # "running": a live process trains it
            return path
    raise TuneforgeError("--resume auto found no unfinished run of this recipe that is not running now "
                         f"(looked at: {', '.join(seen[:5]) or 'nothing under runs/'}); pass the run directory "
                         "explicitly (`tuneforge train --resume RUN_DIR`), or start a new run without --resume")


def check_resumable(run_dir: Path, log) -> Path:
    """The newest valid resumable checkpoint of ``run_dir`` (whose lock this process holds),
    after tidying what a crash left; a completed run has nothing to resume."""
    from ..engine.checkpoint import newest_valid, recover

    manifest = read_manifest(run_dir)
    if manifest.get("status") == "completed":
        raise TuneforgeError(f"{run_dir} completed at step {manifest.get('steps', '?')}: there is nothing to resume "
                             f"(its model is in {run_dir / 'model'}); to train further, start a new run from its "
                             f"weights with --init-from {run_dir}, or train it again with --overwrite")
    if manifest.get("status") == "running":  # and this process holds its lock: whoever wrote that is gone
        log(f"resume: {run_dir} was {INTERRUPTED}" + (f": pid {manifest['pid']} on {manifest.get('host', '?')}"
                                                      if manifest.get("pid") is not None else ""))
    checkpoints = Path(run_dir) / "checkpoints"
    recover(checkpoints, None, report=log)
    checkpoint = newest_valid(checkpoints, report=log)
    recover(checkpoints, checkpoint, report=log)
    if checkpoint is None:
        backup = previous_of(run_dir)
        kept = (f"; the run it replaced is kept in {backup} (put it back with `rm -r {run_dir} && mv {backup} "
                f"{run_dir}`)" if backup.exists() else "")
        raise TuneforgeError(f"{run_dir} has no valid resumable checkpoint to continue from; start it again with "
                             f"--overwrite (or set train.save_every to checkpoint more often){kept}")
    return checkpoint


# Paths of the recipe: relative ones start where the run started (the manifest's cwd) or where
# it resumes, so a resume from another directory compares the files, not the spelling.
_PATHS = ("data.train", "data.validation", "data.test", "model.name", "model.weights", "model.init_from", "retain.data",
          "retain.head_from")


def _resolved(flat: dict, base: Path) -> dict:
    out = dict(flat)
    for key in _PATHS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            out[key] = os.path.realpath(base / value)
        elif isinstance(value, str) and value and Path(value).exists():
            out[key] = os.path.realpath(value)
    return out


def recipe_of_run(run_dir: Path, overrides: list[str] | None = None):
    """The recipe a run was started with (its config.yaml), relative paths made absolute from the
    directory it started in: `tuneforge train --resume RUN_DIR` needs nothing else."""
    from ..recipe import load_recipe, run_config_data

    config = Path(run_dir) / "config.yaml"
    try:
        data = run_config_data(yaml.safe_load(config.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError) as err:
        raise TuneforgeError(f"cannot read {config} ({err}); pass the recipe the run started with: "
                             f"`tuneforge train RECIPE --resume {run_dir}`") from None
    cwd = Path(read_manifest(run_dir).get("cwd") or ".")
    for key in _PATHS:
        section, name = key.split(".")
        value = (data.get(section) or {}).get(name)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (cwd / value).exists():
            data[section][name] = str(cwd / value)
    data.setdefault("output", {})["dir"] = str(run_dir)
    return load_recipe(data, overrides)


def check_same_run(run_dir: Path, recipe, fingerprints: dict) -> None:
    """Refuse to resume when the recipe or the data differ from the run's own."""
    from ..recipe import run_config_data  # a run from before tasks owned their options saved them all

    manifest = read_manifest(run_dir)
    saved = _resolved(_flatten(run_config_data(yaml.safe_load((run_dir / "config.yaml").read_text()))),
                      Path(manifest.get("cwd") or "."))
    now = _resolved(_flatten(recipe.dump()), Path.cwd())
    diffs = [k for k in sorted(set(saved) | set(now))
             if not k.startswith(_FREE) and saved.get(k) != now.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:6])
        raise TuneforgeError(
            f"cannot resume {run_dir}: the recipe differs from the run's own ({shown}). Resume continues a run "
            "exactly; to change settings, start a new run from its weights with --init-from " + str(run_dir))
    for split, fp in fingerprints.items():
        old = manifest.get("data", {}).get(split, {}).get("sha256")
        if old and old != fp.get("sha256"):
            raise TuneforgeError(
                f"cannot resume {run_dir}: data.{split} ({fp.get('path')}) changed since the run started "
                "(sha256 differs); restore the original file, or start a new run with --init-from " + str(run_dir))


def warm_start(model, run_dir: str, labels, log) -> dict:
    """Copy another run's final weights into ``model`` (before the strategy is applied); -> what
    its saved model must record to be rebuilt (``artifact.copy_run_weights``)."""
    from .artifact import copy_run_weights

    record = copy_run_weights(model, run_dir, labels, where=f"--init-from {run_dir}")
    log(f"warm start: weights from {run_dir} ({record['tensors']} tensors"
        + ("; head re-initialised: the label set differs" if not record["same_labels"] else "")
        + "); optimizer, schedule and data order start fresh")
    return record
