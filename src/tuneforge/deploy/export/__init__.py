"""`tuneforge export RUN_DIR --format onnx|safetensors --out DIR [--quantize int8]`.

Every export is checked before it is called done: the exported artifact runs in its own
runtime (onnxruntime for ONNX; a fresh ``tuneforge.load`` for safetensors) on sample
inputs — up to 16 rows of the run's own validation (or training) data, or synthetic
inputs when that data is gone — and its logits are compared with the original model's.
The maximum absolute difference and the agreement of predicted labels are printed and
written to ``export.json``; a failed check is an error and leaves no half-made export
behind (the files are written into a temporary folder and renamed at the end).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ...errors import TuneforgeError

FORMATS = ("onnx", "safetensors", "hf")
TOLERANCE = 1e-4  # fp32 exports: max |logit difference| / max(1, max |logit|)
INT8_MIN_AGREEMENT = 0.9  # dynamic int8: share of sample predictions that must keep their label


class _Logits(nn.Module):
    """Plain tensors in, logits out: the signature an exporter can trace."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)))


def _sample_inputs(run_dir: Path, task, n: int) -> tuple[dict, list | None, str]:
    """Up to ``n`` encoded inputs from the run's own data (validation first), their label
    ids when known, and a line saying where they came from."""
    from ...recipe import from_run_config

    config = run_dir / "config.yaml"
    if config.exists():
        recipe = from_run_config(config)  # runs of any version, old flat task blocks included
        for split in ("validation", "test", "train"):
            path = getattr(recipe.data, split, None)
            if not path or not Path(path).exists():
                continue
            try:
                records = task.read(split, path, limit=n, skipped=[])
            except TuneforgeError:
                continue
            if records:
                key = "text" if task.modality == "text" else "image"
                inputs = task.encode_inputs([r.values[key] for r in records])
                return inputs, [r.values.get("label") for r in records], f"{len(records)} rows of {path}"
    g = torch.Generator().manual_seed(0)
    if task.modality == "text":
        vocab = getattr(task.tokenizer, "vocab_size", 100)
        ids = torch.randint(5, max(6, vocab), (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0  # one padded row: the exported graph must honour the mask
        return {"input_ids": ids, "attention_mask": mask}, None, "4 synthetic token sequences (the run's data is gone)"
    size = task.preprocessing.get("input_size", [3, 224, 224])
    return ({"pixel_values": torch.randn(4, *[int(s) for s in size], generator=g)}, None,
            "4 synthetic images (the run's data is gone)")


def _plain_model(model: nn.Module, meta: dict) -> nn.Module:
    """A model whose weights are all ordinary parameters of the base architecture + head."""
    if hasattr(model, "merge_and_unload"):
        if meta["strategy"] not in ("lora", "ia3"):
            raise TuneforgeError(f"strategy {meta['strategy']} keeps virtual tokens outside the weights; "
                                 "--format safetensors needs a plain model — use --format onnx")
        return model.merge_and_unload()
    return model


def export_run(run_dir, fmt: str, out, *, quantize: str | None = None, samples: int = 16, overwrite: bool = False,
               log=print) -> dict:
    from ...run.artifact import load_model_dir

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise TuneforgeError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise TuneforgeError(f"--quantize {quantize}: only int8 is supported")
    if quantize and fmt != "onnx":
        raise TuneforgeError("--quantize int8 is dynamic int8 quantization of an ONNX graph; use it with --format onnx")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TuneforgeError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    model, task, labels, meta = load_model_dir(run_dir)
    if meta["task"].get("classifier") == "label-words":
        raise TuneforgeError(
            "this run classifies with task.classifier: label-words (the whole causal LM scores each label's words), "
            "which the exporters do not write yet; serve it with `tuneforge serve` / `tuneforge predict`, load "
            "model/backbone (a full run's fine-tuned causal LM) with transformers, or train with "
            "task.classifier: head to export a classification head")
    model.eval()
    if getattr(task, "generative", False):
        return _export_causal_lm(model, task, meta, fmt, out, log)
    inputs, label_values, where = _sample_inputs(run_dir if (run_dir / "config.yaml").exists() else run_dir.parent,
                                                 task, samples)
    with torch.inference_mode():
        reference = model(**inputs).float()  # (N, C)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        t0 = time.perf_counter()
        if fmt == "onnx":
            report = _export_onnx(model, task, labels, meta, inputs, reference, tmp, quantize)
        elif fmt == "hf":
            report = _export_hf(model, task, labels, meta, inputs, reference, tmp)
        else:
            report = _export_safetensors(model, meta, run_dir, inputs, reference, tmp)
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
        _publish(tmp, out, report)
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


def _export_causal_lm(model, task, meta: dict, fmt: str, out: Path, log) -> dict:
    """A causal LM exports as one plain Hugging Face directory (LoRA/IA3 merged): the format that
    transformers, vLLM, TGI and llama.cpp's converters read. Checked: the exported model's
    next-token logits on a sample text equal the run's."""
    from transformers import AutoModelForCausalLM

    from ...tasks.causal_lm import core_model

    if fmt != "hf":
        raise TuneforgeError(f"--format {fmt}: a {meta['task']['type']} run exports as --format hf (a plain Hugging "
                             "Face causal-LM directory that transformers, vLLM, TGI and llama.cpp's converters load)")
    core = core_model(_plain_model(model, meta))
    text = task.template.prompt([{"role": "user", "content": "Hello, how are you?"}])
    ids = torch.tensor([task.tokenizer(text, add_special_tokens=False)["input_ids"]])
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        with torch.inference_mode():
            reference = core(input_ids=ids).float()
        core.lm.save_pretrained(str(tmp), safe_serialization=True)
        task.tokenizer.save_pretrained(str(tmp))
        with torch.inference_mode():
            got = AutoModelForCausalLM.from_pretrained(str(tmp)).eval()(input_ids=ids).logits.float()
        diff = float((got - reference).abs().max())
        report = {"format": "hf", "max_abs_diff": diff, "tokens_checked": int(ids.numel()),
                  "merged": meta["strategy"] in ("lora", "ia3"), "chat_template": task.template_name}
        if diff > 1e-3 * max(1.0, float(reference.abs().max())):
            raise TuneforgeError(f"the exported causal LM's logits differ from the run's by up to {diff:.3g} "
                                 "(tolerance 1e-3 x max(1, |logit|)); nothing was written")
        _publish(tmp, out, report)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"export hf: {out} — parity on {ids.numel()} tokens: max |logit diff| {diff:.3g}")
    return report


def _publish(tmp: Path, out: Path, report: dict) -> None:
    """Write the report next to the checked export, then move the whole directory into place."""
    (tmp / "export.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)


def _compare(reference: torch.Tensor, got: torch.Tensor, tolerance: float | None, min_agreement: float) -> dict:
    diff = float((got - reference).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    agreement = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    ok = agreement >= min_agreement and (tolerance is None or diff <= tolerance * scale)
    rule = (f"|diff| <= {tolerance:g} x max(1, |logit|) and every label equal" if tolerance is not None
            else f"labels agree on >= {min_agreement:.0%}")
    return {"max_abs_diff": diff, "logit_scale": scale, "label_agreement": agreement, "rule": rule,
            "check": "passed" if ok else "FAILED"}


def _fail(report: dict, what: str) -> None:
    if report["check"] != "passed":
        raise TuneforgeError(f"{what} parity check failed: max |logit diff| {report['max_abs_diff']:.3g}, labels agree "
                             f"{report['label_agreement']:.1%} (rule: {report['rule']}); nothing was written")


def _export_onnx(model, task, labels, meta, inputs: dict, reference, tmp: Path, quantize) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise TuneforgeError("--format onnx needs onnx and onnxruntime: pip install 'tuneforge[export]'") from None
    names = tuple(inputs)
    wrapper = _Logits(model, names).eval()
    dynamic = {name: ({0: "batch", 1: "sequence"} if name != "pixel_values" else {0: "batch"}) for name in names}
    path = tmp / "model.onnx"
    # The TorchScript exporter: it traces our plain-tensor wrapper in seconds and needs no
    # extra packages; dynamic batch and sequence axes are declared explicitly.
    # Its tracer warnings (Python branches on shapes inside transformers) are silenced: the
    # parity check below, on real rows of other lengths, is what tells whether the graph holds.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs[n] for n in names), str(path), input_names=list(names),
                          output_names=["logits"], dynamic_axes={**dynamic, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    report = {"files": ["model.onnx"]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: inputs[n].numpy() for n in names}
    report.update(_compare(reference, torch.from_numpy(session.run(["logits"], feeds)[0]).float(), TOLERANCE, 1.0))
    _fail(report, "ONNX")
    report["bytes"] = path.stat().st_size
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = tmp / "model.int8.onnx"
        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
        session = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
        q_logits = torch.from_numpy(session.run(["logits"], feeds)[0]).float()
        q = _compare(reference, q_logits, None, INT8_MIN_AGREEMENT)
        report["_int8_predictions"] = q_logits.argmax(-1)
        report["int8"] = {**q, "bytes": qpath.stat().st_size,
                          "size_ratio": round(qpath.stat().st_size / path.stat().st_size, 3)}
        _fail(q, "int8")
        path.unlink()  # the quantized graph is the export; the fp32 one was only its source
        report["files"] = ["model.int8.onnx"]
        report.update({k: q[k] for k in ("max_abs_diff", "label_agreement", "check", "rule")})
    _write_preprocessing(task, labels, meta, tmp, names)
    return report


def _write_preprocessing(task, labels, meta, tmp: Path, names) -> None:
    labels.save(tmp / "labels.json")
    settings = {"modality": task.modality, "inputs": list(names), "outputs": ["logits"],
                "multi_label": labels.multi_label, "strategy": meta["strategy"], "family": meta["family"]}
    if task.modality == "text":
        task.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        settings.update(max_length=task.max_length, pooling=meta["task"].get("pooling"),
                        tokenizer="tokenizer/", padding="right, to the longest in the batch")
    else:
        settings["preprocessing"] = task.preprocessing
    (tmp / "preprocessing.json").write_text(json.dumps(settings, indent=2))


def _export_safetensors(model, meta, run_dir: Path, inputs: dict, reference, tmp: Path) -> dict:
    from safetensors.torch import save_file

    from ...run.artifact import load_model_dir

    if meta.get("layout") == "base+trainable" and meta["strategy"] != "bitfit":
        raise TuneforgeError(f"strategy {meta['strategy']} adds modules to the backbone; --format safetensors writes the "
                             "plain architecture — use --format onnx (it runs any strategy's graph)")
    plain = _plain_model(model, meta)
    source = run_dir / "model" if (run_dir / "model" / "tuneforge.json").exists() else run_dir
    out_meta = dict(meta)
    out_meta.pop("strategy_options", None)
    out_meta["exported_from"] = str(run_dir)
    backbone = plain.backbone
    if meta.get("base_spec", {}).get("kind") == "hf":
        backbone.save_pretrained(str(tmp / "backbone"), safe_serialization=True)
        from transformers import AutoTokenizer

        tok_dir = next((d for d in (source / "backbone", source / "tokenizer") if (d / "tokenizer_config.json").exists()),
                       None)
        if tok_dir is None:
            raise TuneforgeError(f"no tokenizer saved in {source}; cannot export a text model without one")
        AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(tmp / "backbone"))
        save_file({k: v.detach().contiguous() for k, v in plain.task_head.state_dict().items()},
                  str(tmp / "head.safetensors"))
        out_meta["layout"] = "hf-backbone+head"
    else:
        save_file({k: v.detach().contiguous() for k, v in plain.state_dict().items()}, str(tmp / "model.safetensors"))
        out_meta["layout"] = "full-state"
    out_meta["strategy"] = meta["strategy"]
    shutil.copy(source / "labels.json", tmp / "labels.json")
    (tmp / "tuneforge.json").write_text(json.dumps(out_meta, indent=2))
    again, _, _, _ = load_model_dir(tmp)  # loaded as a user would: tuneforge.load(DIR)
    with torch.inference_mode():
        got = again(**inputs).float()
    report = {"files": sorted(p.name for p in tmp.iterdir()), **_compare(reference, got, TOLERANCE, 1.0)}
    _fail(report, "safetensors")
    return report


HF_README = """# {name}

Exported by tuneforge from `{source}` ({strategy}{merged}). Plain `transformers`, no tuneforge:

```python
import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

tok = AutoTokenizer.from_pretrained("DIR")
encoder = AutoModel.from_pretrained("DIR").eval()
head = load_file("DIR/classifier_head.safetensors")       # weight (C, H), bias (C,)
config = json.load(open("DIR/tuneforge_head.json"))       # pooling, labels, max_length

enc = tok(["some text"], padding=True, truncation=True, max_length=config["max_length"], return_tensors="pt")
hidden = encoder(**enc).last_hidden_state                  # (B, T, H)
if config["pooling"] == "cls":
    pooled = hidden[:, 0]
elif config["pooling"] == "last":                          # the last real token (decoder LLMs)
    last = (enc["attention_mask"] * torch.arange(hidden.shape[1])).argmax(1)
    pooled = hidden[torch.arange(hidden.shape[0]), last]
else:                                                      # mean over real tokens
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
logits = pooled @ head["weight"].T + head["bias"]
labels = [config["labels"][i] for i in logits.argmax(-1)]
```
"""


def _hf_logits(directory: Path, inputs: dict) -> torch.Tensor:
    """Exactly the README's plain-transformers code: the parity check runs what a user would."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(directory)).eval()
    head = load_file(str(directory / "classifier_head.safetensors"))
    config = json.loads((directory / "tuneforge_head.json").read_text())
    with torch.inference_mode():
        hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        if config["pooling"] == "cls":
            pooled = hidden[:, 0]
        elif config["pooling"] == "last":
            last = (inputs["attention_mask"] * torch.arange(hidden.shape[1])).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return (pooled @ head["weight"].T + head["bias"]).float()


def _export_hf(model, task, labels, meta, inputs: dict, reference, tmp: Path) -> dict:
    """A Hugging Face directory: the encoder (LoRA/IA3 merged into it), its tokenizer, the
    head as safetensors and the pooling; loads with plain ``transformers``."""
    from safetensors.torch import save_file

    if task.modality != "text" or meta.get("base_spec", {}).get("kind") != "hf":
        raise TuneforgeError("--format hf is for Hugging Face text models; for image models use --format onnx "
                             "or --format safetensors")
    if meta.get("layout") == "base+trainable" and meta["strategy"] != "bitfit":
        raise TuneforgeError(f"strategy {meta['strategy']} adds modules a plain transformers model does not have; "
                             "use --format onnx")
    plain = _plain_model(model, meta)
    plain.backbone.save_pretrained(str(tmp), safe_serialization=True)
    task.tokenizer.save_pretrained(str(tmp))
    save_file({k: v.detach().contiguous() for k, v in plain.task_head.state_dict().items()},
              str(tmp / "classifier_head.safetensors"))
    head = {"pooling": meta["task"].get("pooling", "mean"), "max_length": task.max_length,
            "labels": [labels.name(i) for i in range(len(labels))], "multi_label": labels.multi_label,
            "activation": "sigmoid" if labels.multi_label else "softmax"}
    (tmp / "tuneforge_head.json").write_text(json.dumps(head, indent=2))
    merged = " merged into the encoder" if hasattr(model, "merge_and_unload") else ""
    (tmp / "README.md").write_text(HF_README.format(name=tmp.name, source=meta.get("base_model", {}).get("name"),
                                                    strategy=meta["strategy"], merged=merged))
    report = {"files": sorted(p.name for p in tmp.iterdir()), "merged": bool(merged),
              **_compare(reference, _hf_logits(tmp, inputs), TOLERANCE, 1.0)}
    _fail(report, "hf")
    return report
