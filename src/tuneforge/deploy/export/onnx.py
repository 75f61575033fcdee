"""``--format onnx`` (+ ``--quantize int8``): a graph for onnxruntime with dynamic batch and
sequence axes, the tokenizer or image preprocessing beside it; checked in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import TuneforgeError
from ...modalities import modality_of
from .common import INT8_MIN_AGREEMENT, TOLERANCE, _Logits, compare, fail


def export(model, task, labels, meta, inputs: dict, reference, tmp: Path, *, quantize=None, **_) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise TuneforgeError("--format onnx needs onnx and onnxruntime: pip install 'tuneforge[export]'") from None
    names = tuple(inputs)
    wrapper = _Logits(model, names).eval()
    variable = modality_of(task.modality).variable_length  # texts: the sequence axis varies too
    dynamic = {name: ({0: "batch", 1: "sequence"} if variable else {0: "batch"}) for name in names}
    # logits per sub-token (token-classification: (B, T, C)) vary in length with the inputs too
    outputs = {0: "batch", 1: "sequence"} if variable and reference.ndim == 3 else {0: "batch"}
    path = tmp / "model.onnx"
    # The TorchScript exporter: it traces our plain-tensor wrapper in seconds and needs no
    # extra packages; dynamic batch and sequence axes are declared explicitly.
    # Its tracer warnings (Python branches on shapes inside transformers) are silenced: the
    # parity check below, on real rows of other lengths, is what tells whether the graph holds.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs[n] for n in names), str(path), input_names=list(names),
                          output_names=["logits"], dynamic_axes={**dynamic, "logits": outputs}, opset_version=17,
                          dynamo=False)
    report = {"files": ["model.onnx"]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: inputs[n].numpy() for n in names}
    report.update(compare(reference, torch.from_numpy(session.run(["logits"], feeds)[0]).float(), TOLERANCE, 1.0))
    fail(report, "ONNX")
    report["bytes"] = path.stat().st_size
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = tmp / "model.int8.onnx"
        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
        session = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
        q_logits = torch.from_numpy(session.run(["logits"], feeds)[0]).float()
        q = compare(reference, q_logits, None, INT8_MIN_AGREEMENT)
        report["_int8_predictions"] = q_logits.argmax(-1)
        report["int8"] = {**q, "bytes": qpath.stat().st_size,
                          "size_ratio": round(qpath.stat().st_size / path.stat().st_size, 3)}
        fail(q, "int8")
        path.unlink()  # the quantized graph is the export; the fp32 one was only its source
        report["files"] = ["model.int8.onnx"]
        report.update({k: q[k] for k in ("max_abs_diff", "label_agreement", "check", "rule")})
    write_preprocessing(task, labels, meta, tmp, names)
    return report


def write_preprocessing(task, labels, meta, tmp: Path, names) -> None:
    labels.save(tmp / "labels.json")
    settings = {"modality": task.modality, "inputs": list(names), "outputs": ["logits"],
                "multi_label": labels.multi_label, "strategy": meta["strategy"], "family": meta["family"]}
    if modality_of(task.modality).tokenized:
        task.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        settings.update(max_length=task.max_length, pooling=meta["task"].get("pooling"),
                        tokenizer="tokenizer/", padding="right, to the longest in the batch",
                        task=meta["task"], task_settings=task.settings())
    else:
        settings["preprocessing"] = task.preprocessing
    (tmp / "preprocessing.json").write_text(json.dumps(settings, indent=2))


