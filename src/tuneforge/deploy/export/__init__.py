"""`tuneforge export RUN_DIR --format onnx|safetensors|hf|gguf --out DIR [--quantize int8] [--gguf-dtype f16|f32]`.

Every export is checked before it is called done: the exported artifact runs in its own
runtime (onnxruntime for ONNX; a fresh ``tuneforge.load`` for safetensors) on sample
inputs — up to 16 rows of the run's own validation (or training) data, or synthetic
inputs when that data is gone — and its logits are compared with the original model's.
The maximum absolute difference and the agreement of predicted labels are printed and
written to ``export.json``; a failed check is an error and leaves no half-made export
behind (the files are written into a temporary folder and renamed at the end).

An export never lands on something else: ``--out`` may not be a run directory, lie inside
one, or hold the run being exported, and an existing non-empty ``--out`` is replaced only
when it is an earlier export (it holds ``export.json``) and ``--overwrite`` is given.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ...errors import TuneforgeError

# format -> the module of this package that writes it (each defines ``export(...) -> report``)
FORMATS = {"onnx": "onnx", "safetensors": "safetensors", "hf": "hf", "gguf": "gguf"}


def check_target(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` whose replacement would destroy something that is not an export."""
    from ...run.rundir import enclosing_run
    from .common import MARKER

    instead = Path(os.path.realpath(run_dir)).parent / f"{Path(os.path.realpath(run_dir)).name}-export"
    run = enclosing_run(out)
    if run is not None:
        raise TuneforgeError(f"--out {out} is the run directory {run} or lies inside it; an export never goes into a "
                             f"run — choose a directory outside it, e.g. --out {instead}")
    source = Path(os.path.realpath(run_dir))
    if source == Path(os.path.realpath(out)) or Path(os.path.realpath(out)) in source.parents:
        raise TuneforgeError(f"--out {out} holds the run being exported ({run_dir}); choose a new directory, e.g. "
                             f"--out {instead}")
    if out.exists() and not out.is_dir():
        raise TuneforgeError(f"--out {out} is a file; give a directory to write the export into")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise TuneforgeError(f"{out} exists, is not empty and is not an earlier export (it has no {MARKER}): "
                                 "tuneforge replaces only its own exports, even with --overwrite — choose a new or "
                                 "empty --out")
        if not overwrite:
            raise TuneforgeError(f"{out} holds an earlier export; choose another --out or pass --overwrite to "
                                 "replace it")


def saved_meta(run_dir: Path) -> dict | None:
    """The run's ``model/tuneforge.json`` (what it saved), read without loading the model."""
    import json

    for directory in (run_dir / "model", run_dir):
        if (directory / "tuneforge.json").is_file():
            return json.loads((directory / "tuneforge.json").read_text())
    return None


def export_run(run_dir, fmt: str, out, *, quantize: str | None = None, samples: int = 16, overwrite: bool = False,
               gguf_dtype: str | None = None, log=print) -> dict:
    from ...run.artifact import load_model_dir
    from .common import publish, sample_inputs
    from .hf import export_causal_lm

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise TuneforgeError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise TuneforgeError(f"--quantize {quantize}: only int8 is supported")
    if quantize and fmt != "onnx":
        raise TuneforgeError("--quantize int8 is dynamic int8 quantization of an ONNX graph; use it with --format onnx")
    if gguf_dtype is not None and fmt != "gguf":
        raise TuneforgeError(f"--gguf-dtype sets the weight type of a GGUF file; use it with --format gguf, not {fmt}")
    check_target(run_dir, out, overwrite)  # before the model loads
    if fmt == "gguf":
        from .gguf import DTYPES, refuse_early

        if (gguf_dtype or "f16") not in DTYPES:
            raise TuneforgeError(f"--gguf-dtype {gguf_dtype}: choose one of {', '.join(DTYPES)}")
        meta = saved_meta(run_dir)
        if meta is not None:  # a missing one gets load_model_dir's error
            refuse_early(meta)
    model, task, labels, meta = load_model_dir(run_dir)
    if task.needs_lm_head and not task.generative:  # label-words: the LM itself scores the labels
        raise TuneforgeError(
            "this run classifies with task.classifier: label-words (the whole causal LM scores each label's words), "
            "which the exporters do not write yet; serve it with `tuneforge serve` / `tuneforge predict`, load "
            "model/backbone (a full run's fine-tuned causal LM) with transformers, or train with "
            "task.classifier: head to export a classification head")
    model.eval()
    if fmt == "gguf":
        from .gguf import export as export_gguf

        return export_gguf(model, task, meta, out, log, dtype=gguf_dtype or "f16", samples=samples, run_dir=run_dir)
    if task.generative:
        return export_causal_lm(model, task, meta, fmt, out, log)
    inputs, label_values, where = sample_inputs(run_dir if (run_dir / "config.yaml").exists() else run_dir.parent,
                                                 task, samples)
    with torch.inference_mode():
        reference = model(**inputs).float()  # (N, C)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        t0 = time.perf_counter()
        exporter = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
        report = exporter.export(model, task, labels, meta, inputs, reference, tmp, quantize=quantize, run_dir=run_dir)
        report.update(format=fmt, source=str(run_dir), samples=where, seconds=round(time.perf_counter() - t0, 2))
        if label_values is not None and all(v is not None for v in label_values):
            try:
                truth = torch.tensor([labels.id(v, "sample") for v in label_values])
                report["sample_accuracy_original"] = round(float((reference.argmax(-1) == truth).float().mean()), 4)
                if "_int8_predictions" in report:
                    report["int8"]["sample_accuracy"] = round(
                        float((report["_int8_predictions"] == truth).float().mean()), 4)
            except TuneforgeError:
                pass
        report.pop("_int8_predictions", None)
        publish(tmp, out, report)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"export {fmt}{' int8' if quantize else ''}: {out} — parity on {where}: max |logit diff| "
        f"{report['max_abs_diff']:.3g}, labels agree {report['label_agreement']:.1%} ({report['check']})")
    if quantize:
        q = report["int8"]
        log(f"int8: {q['bytes']:,} bytes ({q['size_ratio']:.0%} of fp32)"
            + (f"; sample accuracy {q['sample_accuracy']:.1%} (fp32 {report['sample_accuracy_original']:.1%})"
               if "sample_accuracy" in q else ""))
    return report
