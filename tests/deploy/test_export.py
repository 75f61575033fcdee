"""Every export format round-trips with a passing parity check, run in the artifact's own
runtime; bad requests get errors that name the fix and write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import TuneforgeError, finetune, load
from tuneforge.deploy.export import export_run


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_text")
    train = write_text_csv(tmp / "train.csv", n=32)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 1})).path


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_lora")
    train = write_text_csv(tmp / "train.csv", n=32)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", "lora", train={"epochs": 1, "lr": 1e-2})).path


def _onnx_logits(out, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    name = next(p.name for p in out.glob("*.onnx"))
    session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def test_onnx_text_export_matches_and_runs_on_its_own(text_run, tmp_path):
    out = tmp_path / "onnx"
    report = export_run(text_run, "onnx", out, log=lambda *_: None)
    assert report["check"] == "passed" and report["label_agreement"] == 1.0
    assert report["max_abs_diff"] <= 1e-4 * report["logit_scale"]
    assert "rows of" in report["samples"]  # the run's own data, not synthetic inputs
    saved = json.loads((out / "export.json").read_text())
    assert saved["max_abs_diff"] == report["max_abs_diff"]
    # standalone: tokenizer + settings beside the graph, any batch size and length
    from transformers import AutoTokenizer

    settings = json.loads((out / "preprocessing.json").read_text())
    tok = AutoTokenizer.from_pretrained(out / settings["tokenizer"])
    texts = ["good fun film", "bad", "a dull and bad and boring long film with good actors"]
    enc = tok(texts, padding=True, return_tensors="np")
    logits = _onnx_logits(out, {"input_ids": enc["input_ids"].astype(np.int64),
                                "attention_mask": enc["attention_mask"].astype(np.int64)})
    probs = torch.softmax(torch.from_numpy(logits), -1)
    expected = load(text_run).predict_proba(texts)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)


def test_onnx_int8_reports_size_and_agreement(text_run, tmp_path):
    report = export_run(text_run, "onnx", tmp_path / "q", quantize="int8", log=lambda *_: None)
    assert report["files"] == ["model.int8.onnx"] and report["int8"]["size_ratio"] < 1.0
    assert report["check"] == "passed" and report["int8"]["label_agreement"] >= 0.9
    assert 0.0 <= report["int8"]["sample_accuracy"] <= 1.0 and "sample_accuracy_original" in report


def test_safetensors_export_of_lora_is_merged_and_loads_without_the_recipe(lora_run, tmp_path):
    out = tmp_path / "st"
    report = export_run(lora_run, "safetensors", out, log=lambda *_: None)
    assert report["check"] == "passed"
    meta = json.loads((out / "tuneforge.json").read_text())
    assert meta["layout"] == "hf-backbone+head" and not (out / "adapter").exists()
    texts = ["good film", "bad bad film"]
    torch.testing.assert_close(load(out).predict_proba(texts), load(lora_run).predict_proba(texts),
                               rtol=1e-4, atol=1e-5)


def test_image_exports(tiny_timm_weights, tmp_path):
    train = write_image_folder(tmp_path / "images", n_per_class=4)
    run = finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run", train={"epochs": 1})).path
    for fmt in ("onnx", "safetensors"):
        report = export_run(run, fmt, tmp_path / fmt, log=lambda *_: None)
        assert report["check"] == "passed" and report["label_agreement"] == 1.0
    images = sorted(str(p) for p in train.rglob("*.png"))[:3]
    torch.testing.assert_close(load(tmp_path / "safetensors").predict_proba(images), load(run).predict_proba(images))


def test_bad_export_requests_name_the_fix_and_write_nothing(text_run, tmp_path):
    with pytest.raises(TuneforgeError, match="--format onnx"):
        export_run(text_run, "safetensors", tmp_path / "a", quantize="int8")
    with pytest.raises(TuneforgeError, match="choose one of"):
        export_run(text_run, "tflite", tmp_path / "b")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(TuneforgeError, match="--overwrite"):
        export_run(text_run, "onnx", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".export-*"))  # no half-made export left behind


def test_a_failed_parity_check_is_an_error(text_run, tmp_path, monkeypatch):
    import tuneforge.deploy.export.onnx as ex

    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(TuneforgeError, match="parity check failed"):
        export_run(text_run, "onnx", tmp_path / "x", log=lambda *_: None)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".export-*"))


def test_export_cli(text_run, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "export", str(text_run), "--format", "onnx", "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["check"] == "passed"
    assert (out / "model.onnx").exists() and (out / "labels.json").exists()


@pytest.mark.parametrize("which", ["text_run", "lora_run"])
def test_hf_export_runs_with_plain_transformers(which, request, tmp_path):
    run = request.getfixturevalue(which)
    out = tmp_path / "hf"
    report = export_run(run, "hf", out, log=lambda *_: None)
    assert report["check"] == "passed" and report["merged"] is (which == "lora_run")
    assert (out / "config.json").exists() and (out / "README.md").exists() and not (out / "adapter_config.json").exists()
    # the README's snippet, run in a fresh interpreter without tuneforge on the path
    code = (out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0].replace("DIR", str(out))
    code = code.replace('["some text"]', '["good fun film", "bad bad film"]') + "\nprint(json.dumps(labels))\n"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = [p["label"] for p in load(run).predict(["good fun film", "bad bad film"])]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def test_export_samples_are_read_with_the_runs_column_mapping(tiny_bert_dir, tmp_path):
    # SST-2 names its columns sentence/label: the export used to look for `text`, find nothing, and
    # check parity on 4 random token sequences ("the run's data is gone")
    data = write_text_csv(tmp_path / "train.csv", n=24)
    data.write_text(data.read_text().replace("text,label\n", "sentence,sentiment\n", 1))
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", train={"epochs": 1},
                         data={"text_column": "sentence", "label_column": "sentiment"})
    run = finetune(recipe).path
    report = export_run(run, "safetensors", tmp_path / "st", log=lambda *_: None)
    assert report["samples"] == f"16 rows of {data}", report["samples"]  # --samples' default 16 ...
    assert "sample_accuracy_original" in report  # ... with their labels, read from `sentiment`
