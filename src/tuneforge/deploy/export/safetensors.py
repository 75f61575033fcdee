"""``--format safetensors``: plain weights + config, loadable by ``tuneforge.load`` without the
recipe; checked by loading it back as a user would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...errors import TuneforgeError
from .common import TOLERANCE, compare, fail, plain_model


def export(model, task, labels, meta, inputs: dict, reference, tmp: Path, *, run_dir: Path, **_) -> dict:
    from safetensors.torch import save_file

    from ...run.artifact import load_model_dir

    plain = plain_model(model, meta)
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
    report = {"files": sorted(p.name for p in tmp.iterdir()), **compare(reference, got, TOLERANCE, 1.0)}
    fail(report, "safetensors")
    return report


