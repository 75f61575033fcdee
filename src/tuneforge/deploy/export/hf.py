"""``--format hf``: a plain Hugging Face directory. A classifier: the encoder (LoRA/IA3 merged),
its tokenizer, the head as safetensors and the pooling, with a README of the plain
``transformers`` code that the parity check itself runs. A causal LM: the whole
``*ForCausalLM`` (merged), which transformers, vLLM, TGI and llama.cpp's converters load."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ...errors import TuneforgeError
from ...modalities import modality_of
from .common import TOLERANCE, compare, fail, plain_model, publish


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


def export(model, task, labels, meta, inputs: dict, reference, tmp: Path, **_) -> dict:
    """A Hugging Face directory: the encoder (LoRA/IA3 merged into it), its tokenizer, the
    head as safetensors and the pooling; loads with plain ``transformers``."""
    from safetensors.torch import save_file

    if not modality_of(task.modality).tokenized or meta.get("base_spec", {}).get("kind") != "hf":
        raise TuneforgeError("--format hf is for Hugging Face text models; for image models use --format onnx "
                             "or --format safetensors")
    if reference.ndim != 2:
        raise TuneforgeError(f"--format hf writes an encoder with a pooled classification head; this "
                             f"{meta['task']['type']} model scores every token — use --format onnx (the per-token "
                             "graph, parity-checked) or --format safetensors")
    plain = plain_model(model, meta)
    plain.backbone.save_pretrained(str(tmp), safe_serialization=True)
    task.tokenizer.save_pretrained(str(tmp))
    save_file({k: v.detach().contiguous() for k, v in plain.task_head.state_dict().items()},
              str(tmp / "classifier_head.safetensors"))
    head = {"pooling": meta["task"].get("pooling", "mean"), "max_length": task.max_length,
            "labels": [labels.name(i) for i in range(len(labels))], "multi_label": labels.multi_label,
            "activation": "sigmoid" if labels.multi_label else "softmax"}
    (tmp / "tuneforge_head.json").write_text(json.dumps(head, indent=2))
    merged = " merged into the encoder" if plain is not model else ""
    (tmp / "README.md").write_text(HF_README.format(name=tmp.name, source=meta.get("base_model", {}).get("name"),
                                                    strategy=meta["strategy"], merged=merged))
    report = {"files": sorted(p.name for p in tmp.iterdir()), "merged": bool(merged),
              **compare(reference, _hf_logits(tmp, inputs), TOLERANCE, 1.0)}
    fail(report, "hf")
    return report


def export_causal_lm(model, task, meta: dict, fmt: str, out: Path, log) -> dict:
    """A causal LM exports as one plain Hugging Face directory (LoRA/IA3 merged): the format that
    transformers, vLLM, TGI and llama.cpp's converters read. Checked: the exported model's
    next-token logits on a sample text equal the run's."""
    from transformers import AutoModelForCausalLM

    from ...llm.model import core_model

    if fmt != "hf":
        raise TuneforgeError(f"--format {fmt}: a {meta['task']['type']} run exports as --format hf (a plain Hugging "
                             "Face causal-LM directory that transformers, vLLM, TGI and llama.cpp's converters load) "
                             "or --format gguf (one llama.cpp file, Llama/Qwen2 models)")
    plain = plain_model(model, meta)
    core = core_model(plain)
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
        # the keys every export report has (the CLI prints them); "labels" of a causal LM are its
        # next-token predictions, one per position of the sample
        agreement = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
        ok = diff <= 1e-3 * max(1.0, float(reference.abs().max()))
        report = {"format": "hf", "max_abs_diff": diff, "label_agreement": agreement,
                  "rule": "|diff| <= 1e-3 x max(1, |logit|) on every next-token logit",
                  "check": "passed" if ok else "FAILED", "tokens_checked": int(ids.numel()),
                  "merged": plain is not model, "chat_template": task.template_name}
        if not ok:
            raise TuneforgeError(f"the exported causal LM's logits differ from the run's by up to {diff:.3g} "
                                 "(tolerance 1e-3 x max(1, |logit|)); nothing was written")
        publish(tmp, out, report)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"export hf: {out} — parity on {ids.numel()} tokens: max |logit diff| {diff:.3g}")
    return report
