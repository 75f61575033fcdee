"""`tuneforge reproduce RUN_DIR`: run a recorded run again from its own record and
compare the metrics, saying which differences are expected and why.

The recorded (resolved) recipe is run as it is, with its data paths made absolute
from the manifest, into a new run directory, with the same torch thread count.
Before running, the data is checked against its recorded sha256 and the installed
packages and machine against the recorded ones; every mismatch is reported.

Expected agreement:

* fp32, ``train.deterministic: true``, same packages, machine, threads and data:
  identical metrics (any difference is reported as a failure);
* otherwise (bf16/fp16, non-deterministic kernels, another machine or library):
  within ``TOLERANCE`` — rates (accuracy, F1, ...) within 0.02 absolute, loss and
  ECE within 5% relative (+0.01) — with the manifest's reasons printed.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import TuneforgeError

TOLERANCE = {"rate_abs": 0.02, "loss_rel": 0.05, "loss_abs": 0.01}
_SKIP = {"examples", "eval_seconds", "step"}


def _load(run_dir: Path) -> tuple[dict, dict, dict]:
    import yaml

    for name in ("manifest.json", "config.yaml", "eval.json"):
        if not (run_dir / name).is_file():
            raise TuneforgeError(f"{run_dir} has no {name}: reproduce needs a completed tuneforge run directory")
    from ..run.rundir import read_manifest

    manifest = read_manifest(run_dir)  # a damaged one is an error that says so, not a JSONDecodeError
    if "reproducibility" not in manifest:
        raise TuneforgeError(f"{run_dir} was made by an older tuneforge without a reproducibility record; "
                             f"run its config.yaml again with `tuneforge train {run_dir}/config.yaml`")
    from ..recipe import run_config_data  # a run from before tasks owned their options saved them all

    try:
        config = run_config_data(yaml.safe_load((run_dir / "config.yaml").read_text()))
        final = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise TuneforgeError(f"{run_dir}: config.yaml or eval.json is damaged ({type(err).__name__}); restore it "
                             "from a copy of the run") from None
    return manifest, config, final


def _absolute(config: dict, manifest: dict) -> dict:
    """Paths in the recipe were relative to the directory the run started in."""
    cwd = Path(manifest.get("cwd", "."))
    for split in ("train", "validation", "test"):
        if config["data"].get(split):
            recorded = (manifest.get("data") or {}).get(split, {}).get("path")
            config["data"][split] = recorded or str(cwd / config["data"][split])
    for section, key in (("model", "name"), ("model", "weights"), ("retain", "data"), ("retain", "head_from")):
        value = (config.get(section) or {}).get(key)
        if value and not Path(value).is_absolute() and (cwd / value).exists():
            config[section][key] = str(cwd / value)
    return config


def environment_changes(manifest: dict) -> list[str]:
    import torch

    from ..run.provenance import environment, package_lock

    old = manifest["reproducibility"]
    out = []
    was, now = set(old.get("lock", [])), set(package_lock())
    if was != now:
        gone, new = sorted(was - now), sorted(now - was)
        out.append(f"packages differ: recorded-only {', '.join(gone[:8]) or '-'}; now-only {', '.join(new[:8]) or '-'}")
    env_now = environment(torch.device(old["environment"].get("device", "cpu")
                                       if torch.cuda.is_available() else "cpu"))
    for key in ("python", "cpu", "machine", "gpu", "cuda", "driver", "torch"):
        if old["environment"].get(key) != env_now.get(key):
            out.append(f"{key}: recorded {old['environment'].get(key)}, now {env_now.get(key)}")
    return out


def compare(old: dict, new: dict, exact: bool) -> list[dict]:
    """One row per scalar metric of each split: old, new, difference, within tolerance."""
    rows = []
    for split in ("validation", "test"):
        if split not in old or split not in new:
            continue
        for key, a in old[split].items():
            b = new[split].get(key)
            if key in _SKIP or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                continue
            diff = b - a
            if exact:
                ok = diff == 0
            elif key.endswith("loss") or key == "ece":
                ok = abs(diff) <= TOLERANCE["loss_rel"] * abs(a) + TOLERANCE["loss_abs"]
            else:
                ok = abs(diff) <= TOLERANCE["rate_abs"]
            rows.append({"split": split, "metric": key, "original": a, "reproduced": b, "difference": diff, "ok": ok})
    return rows


def reproduce(run_dir, *, output: str | None = None, console=None) -> dict:
    import torch

    from ..run.finetune import finetune
    from ..run.provenance import data_changes

    run_dir = Path(run_dir)
    manifest, config, old_eval = _load(run_dir)
    notes = [f"data changed since the run: {c}" for c in data_changes(manifest)] + environment_changes(manifest)
    mismatched = bool(notes)
    threads = manifest["reproducibility"]["environment"].get("torch_threads")
    if threads and threads != torch.get_num_threads():
        notes.append(f"torch threads set to the recorded {threads} (was {torch.get_num_threads()})")
        torch.set_num_threads(threads)
    config = _absolute(config, manifest)
    out = Path(output) if output else run_dir.with_name(f"{run_dir.name}-repro-{datetime.now():%Y%m%d-%H%M%S}")
    config["output"]["dir"] = str(out)
    if threads:  # the recorded count, not whatever train.threads: auto would pick on this machine now
        config.setdefault("train", {})["threads"] = threads
    init_from = manifest.get("init_from")  # a warm start repeats from the same weights
    if init_from and not Path(init_from).is_absolute():
        init_from = str(Path(manifest.get("cwd", ".")) / init_from)
    run = finetune(config, console=console, argv=["tuneforge", "reproduce", str(run_dir)], overwrite=False,
                   init_from=init_from)
    det = manifest["reproducibility"]["determinism"]
    exact = (manifest.get("precision") == "fp32" and det["deterministic_algorithms"] and not mismatched
             and not manifest["reproducibility"]["environment"].get("device", "cpu").startswith("cuda"))
    rows = compare(old_eval, run.metrics, exact)
    result = {
        "original": str(run_dir), "reproduction": str(run.path), "expected": "identical" if exact else "within tolerance",
        "tolerance": None if exact else TOLERANCE, "ok": all(r["ok"] for r in rows), "notes": notes,
        "why_it_may_differ": manifest["reproducibility"].get("may_not_reproduce", []), "metrics": rows,
    }
    (run.path / "reproduction.json").write_text(json.dumps(result, indent=2))
    return result


def render(result: dict) -> str:
    lines = [f"reproduced {result['original']} -> {result['reproduction']}",
             f"expected: {result['expected']}" + (f" (tolerance {result['tolerance']})" if result["tolerance"] else "")]
    lines += [f"note: {n}" for n in result["notes"]]
    lines.append(f"{'split':10s} {'metric':20s} {'original':>12s} {'reproduced':>12s} {'difference':>12s}")
    for r in result["metrics"]:
        flag = "" if r["ok"] else "  <- beyond tolerance" if result["tolerance"] else "  <- differs"
        lines.append(f"{r['split']:10s} {r['metric']:20s} {r['original']:12.6g} {r['reproduced']:12.6g} "
                     f"{r['difference']:+12.3g}{flag}")
    same = sum(r["difference"] == 0 for r in result["metrics"])
    lines.append(f"{same} of {len(result['metrics'])} metrics identical; "
                 + ("all within what was expected" if result["ok"] else "SOME DIFFER MORE THAN EXPECTED"))
    if any(r["difference"] for r in result["metrics"]) and result["why_it_may_differ"]:
        lines.append("why they may differ (from the run's manifest):")
        lines += [f"  - {c['what']}: {c['why']}" for c in result["why_it_may_differ"]]
    return "\n".join(lines)
