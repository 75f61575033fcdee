"""A finished job's results file (OpenAI's ``result_files``): its step metrics as CSV.

One row per optimizer step that logged or evaluated, from the run's ``metrics.jsonl`` (which a
resumed run has already trimmed to what the final run really did): ``step, train_loss,
valid_loss, valid_<metric> ...``. Stored by content hash like every file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from .files import store_path


def step_rows(run_dir: Path) -> list[dict]:
    rows: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") not in ("train", "eval") or "step" not in event:
            continue
        row = rows.setdefault(int(event["step"]), {"step": int(event["step"])})
        if event["event"] == "train":
            row["train_loss"] = event.get("loss")
        else:
            for key, value in event.items():
                if key not in ("event", "split", "step", "epoch", "eval_seconds") and isinstance(value, (int, float)):
                    row[f"valid_{key}"] = value
    return [rows[k] for k in sorted(rows)]


def results_file(run_dir: Path, data_dir: Path) -> tuple[Path, str, int, int]:
    """Write the CSV into the file store: (path, sha256, bytes, rows)."""
    rows = step_rows(run_dir)
    columns = ["step", "train_loss"] + sorted({k for r in rows for k in r} - {"step", "train_loss"})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = out.getvalue().encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    path = store_path(data_dir, sha)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{sha}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path, sha, len(data), len(rows)
