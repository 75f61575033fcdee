"""Batch prediction: `tuneforge predict RUN_DIR --file in.csv|in.jsonl|image_dir --out preds.jsonl`.

Inputs go through the model in batches and every batch's results are written (and
flushed) before the next is read, so a crash, a Ctrl-C or a bad record never costs the
predictions already made. A bad record (an unreadable image, a malformed row) becomes an
``{"id", "error"}`` line and prediction goes on; with ``on_error="stop"`` it stops there,
keeping everything written before it.

The output never replaces an input: an ``--out`` that is the input file (the same path, or
the same file through a link) or a file of a run directory is refused before the model
loads, and predictions go to a temporary file beside ``--out`` that is renamed to it at the
end — also when prediction stops early, so what was written is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import TuneforgeError

from ..modalities import IMAGE_SUFFIXES, modality_of  # noqa: F401 - IMAGE_SUFFIXES kept for old imports


def check_output(out, inputs=()) -> Path:
    """``out`` if predictions may be written there; an input, a directory or a run's own file is refused."""
    from ..run.rundir import RUN_DIRS, RUN_FILES, enclosing_run

    path = Path(out)
    if path.is_file():  # a file that does not exist yet is no input; one that does is compared by inode
        for source in inputs:
            source = Path(source)
            if source.is_file() and os.path.samefile(path, source):
                raise TuneforgeError(
                    f"--out {out} is the input file {source}: the predictions would replace it; write them to "
                    f"another file, e.g. --out {path.with_name(path.stem + '.predictions.jsonl')}")
    if path.is_dir():
        raise TuneforgeError(f"--out {out} is a directory; give a file name, e.g. --out {path / 'predictions.jsonl'}")
    run = enclosing_run(path.parent) if path.parent.exists() else None
    if run is not None and path.exists():
        part = Path(os.path.realpath(path)).relative_to(run).parts[0]
        if part in RUN_FILES or part in RUN_DIRS:
            raise TuneforgeError(f"--out {out} is a file of the run {run}; write the predictions to a new file")
    if not path.parent.is_dir():
        raise TuneforgeError(f"--out {out}: the directory {path.parent} does not exist; create it first")
    return path


@contextlib.contextmanager
def output_file(out, inputs=()):
    """stdout without ``out``; else a temporary file beside ``out``, renamed to it at the end
    (however prediction ends: what was written is kept)."""
    if not out:
        yield sys.stdout
        return
    path = check_output(out, inputs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sink = open(tmp, "w", encoding="utf-8")
    try:
        yield sink
    finally:
        sink.close()
        os.replace(tmp, path)


def _items(predictor, source: str, column: str | None, id_column: str | None, skipped: list) -> tuple[list, int]:
    """(id, input) pairs; an image folder is listed, a table read with the hardened reader."""
    path = Path(source)
    if not path.exists():
        raise TuneforgeError(f"--file {source} does not exist")
    spec = modality_of(predictor.meta["modality"])
    if spec.files and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in spec.suffixes)
        if not files:
            raise TuneforgeError(f"{source} holds no {spec.name} files ({', '.join(sorted(spec.suffixes))})")
        return [(str(p), str(p)) for p in files], len(files)
    from ..data.records import read_records

    column = column or spec.input
    columns = {"input": column}
    if id_column:
        columns["id"] = id_column
    records = read_records(source, columns=columns, hints={"input": "--column", "id": "--id-column"},
                           on_bad_record="skip", skipped=skipped, unique=("id",) if id_column else ())
    base = path.parent
    out = []
    for r in records:
        value = r.values["input"]
        if spec.files and isinstance(value, str) and not Path(value).is_absolute():
            value = str(base / value)  # manifest paths are relative to the manifest
        out.append((r.values.get("id", r.where), value))
    return out, len(out)


def _encode(predictor, batch: list) -> tuple[dict | None, list, list]:
    """Encode a batch; inputs that fail on their own are returned as (id, error) and left out."""
    try:
        return predictor.task.encode_inputs([x for _, x in batch]), batch, []
    except TuneforgeError:
        pass
    good, bad, encoded = [], [], []
    for item in batch:  # find the culprit(s): encode one by one
        try:
            encoded.append(predictor.task.encode_inputs([item[1]]))
            good.append(item)
        except TuneforgeError as err:
            bad.append((item[0], str(err)))
    if not good:
        return None, [], bad
    # encoded together again: padded to one length (texts), stacked (images)
    return predictor.task.encode_inputs([x for _, x in good]), good, bad


def predict_file(run_dir, source: str, out: str | None, *, column: str | None = None, id_column: str | None = None,
                 batch_size: int = 64, on_error: str = "continue", progress: bool = True, console=None) -> dict:
    from .predictor import open_predictor

    if on_error not in ("continue", "stop"):
        raise TuneforgeError(f"--on-error must be continue or stop, got {on_error!r}")
    if out:
        check_output(out, [source])  # before the model loads
    predictor = open_predictor(run_dir, batch_size=batch_size)
    skipped: list = []
    items, total = _items(predictor, source, column, id_column, skipped)
    files = [value for _, value in items if isinstance(value, str)] if modality_of(predictor.meta["modality"]).files else []
    counts = {"predicted": 0, "errors": 0, "skipped_rows": len(skipped)}
    with output_file(out, [source, *files]) as sink:  # images listed in a manifest are inputs too
        for where in skipped:  # malformed rows the reader dropped: reported in the output too
            sink.write(json.dumps({"id": where.split(":", 1)[0], "error": where}) + "\n")
        for batch in _batches(items, batch_size, progress, console, total):
            inputs, good, bad = _encode(predictor, batch)
            if inputs is not None:
                probs = predictor.proba_from_encoded(inputs)
                for (item_id, _), result in zip(good, predictor.format(probs, inputs=[x for _, x in good])):
                    sink.write(json.dumps({"id": item_id, **result}) + "\n")
                counts["predicted"] += len(good)
            for item_id, message in bad:
                sink.write(json.dumps({"id": item_id, "error": message}) + "\n")
                counts["errors"] += 1
                if on_error == "stop":
                    sink.flush()
                    raise TuneforgeError(f"{message} — stopped (--on-error stop); the {counts['predicted']} "
                                         f"predictions before it are in {out or 'the output'}")
            sink.flush()
    return counts


def _batches(items: list, size: int, progress: bool, console, total: int) -> Iterator[list]:
    chunks = (items[i:i + size] for i in range(0, len(items), size))
    if not progress:
        yield from chunks
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("predict", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("predict", total=total)
        for chunk in chunks:
            yield chunk
            bar.advance(task, len(chunk))
