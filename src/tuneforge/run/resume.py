"""Two ways to continue from an earlier run, and they are different verbs:

- **resume** (``--resume RUN_DIR`` / ``--resume auto``): the *same* run continues
  exactly from its newest valid checkpoint — weights, optimizer, schedule,
  gradient scaler, every RNG, the position in the data order and the callbacks'
  state — so it ends as if it had never stopped. The recipe and data must be the
  ones the run started with.
- **warm start** (``--init-from RUN_DIR``): a *new* run whose model starts from
  another run's final weights; optimizer, schedule and data order start fresh,
  and any recipe may be used.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import TuneforgeError
from .rundir import RUN_MARKER

# Keys that may differ between a run and its resumption (they do not change the result).
_FREE = ("output.", "train.progress")


def _flatten(data, prefix=""):
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def find_run_to_resume(spec: str, recipe, origin: str | None) -> Path:
    """``spec`` is a run directory or ``auto`` (the newest unfinished run of this recipe)."""
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
    for path in candidates:
        try:
            manifest = json.loads((path / RUN_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("status") != "completed":
            return path
    raise TuneforgeError("--resume auto found no unfinished run of this recipe "
                         f"(looked at: {', '.join(map(str, candidates[:5])) or 'nothing under runs/'}); "
                         "pass the run directory explicitly, or start a new run without --resume")


def check_same_run(run_dir: Path, recipe, fingerprints: dict) -> None:
    """Refuse to resume when the recipe or the data differ from the run's own."""
    from ..recipe import run_config_data  # a run from before tasks owned their options saved them all

    saved = _flatten(run_config_data(yaml.safe_load((run_dir / "config.yaml").read_text())))
    now = _flatten(recipe.dump())
    diffs = [k for k in sorted(set(saved) | set(now))
             if not k.startswith(_FREE) and saved.get(k) != now.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:6])
        raise TuneforgeError(
            f"cannot resume {run_dir}: the recipe differs from the run's own ({shown}). Resume continues a run "
            "exactly; to change settings, start a new run from its weights with --init-from " + str(run_dir))
    manifest = json.loads((run_dir / RUN_MARKER).read_text())
    for split, fp in fingerprints.items():
        old = manifest.get("data", {}).get(split, {}).get("sha256")
        if old and old != fp.get("sha256"):
            raise TuneforgeError(
                f"cannot resume {run_dir}: data.{split} ({fp.get('path')}) changed since the run started "
                "(sha256 differs); restore the original file, or start a new run with --init-from " + str(run_dir))


def warm_start(model, run_dir: str, labels, log) -> None:
    """Copy another run's final weights into ``model`` (before the strategy is applied)."""
    from .artifact import load_model_dir

    from ..strategies.base import merged_module

    source, _, source_labels, _ = load_model_dir(Path(run_dir))
    source = merged_module(source)  # a LoRA run: its adapter folded into the weights
    state = source.state_dict()
    same_labels = source_labels.names == labels.names
    if not same_labels:
        state = {k: v for k, v in state.items() if not k.startswith("task_head.")}
    target = model.state_dict()
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise TuneforgeError(f"--init-from {run_dir}: its model does not match this recipe's "
                             f"({', '.join(mismatched[:3])} differ in shape); use the same model.name")
    foreign = [k for k in state if k not in target]
    if foreign:
        # adapters / prompt or prefix tuning: weights outside the base architecture, which a
        # warm start (before the strategy is applied) would drop without a word
        raise TuneforgeError(f"--init-from {run_dir}: its model holds weights the base model has no place for "
                             f"({', '.join(foreign[:3])}), e.g. adapters or virtual tokens, so they cannot seed a "
                             "new run; warm-start from a full, partial, bitfit, lora or ia3 run instead")
    missing, _ = model.load_state_dict(state, strict=False)
    log(f"warm start: weights from {run_dir} ({len(state)} tensors"
        + ("; head re-initialised: the label set differs" if not same_labels else "")
        + "); optimizer, schedule and data order start fresh")
