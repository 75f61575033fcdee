"""Speed options change how the work is laid out, never the result: channels-last images
and a compiled backbone train to the same weights (within kernel tolerance) and save
models that load and predict like any other run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import finetune, load


def _losses(run):
    return [json.loads(x)["loss"] for x in (run.path / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


def test_channels_last_trains_like_contiguous(tiny_timm_weights, tmp_path):
    train = write_image_folder(tmp_path / "images", n_per_class=8)
    runs = {mode: finetune(image_recipe(tiny_timm_weights, train, tmp_path / mode,
                                        train={"channels_last": mode}, data={"augment": False}))
            for mode in ("on", "off")}
    assert _losses(runs["on"]) == pytest.approx(_losses(runs["off"]), rel=1e-3, abs=1e-4)
    a = load_file(str(runs["on"].path / "model" / "model.safetensors"))
    b = load_file(str(runs["off"].path / "model" / "model.safetensors"))
    # Convolution kernels sum in another order in NHWC; Adam turns a near-zero gradient's
    # sign noise into a full lr-sized step, so a weight may move by up to lr x steps (6e-3).
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=6e-3, msg=k)
    # the saved model is an ordinary one: it loads and predicts the same classes as the other
    images = sorted(str(p) for p in train.rglob("*.png"))[:6]
    assert [p["label"] for p in load(runs["on"].path).predict(images)] == \
           [p["label"] for p in load(runs["off"].path).predict(images)]


def test_channels_last_auto_is_off_on_cpu(tiny_timm_weights, tmp_path, capsys):
    train = write_image_folder(tmp_path / "images", n_per_class=4)
    finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run", train={"epochs": 1}))
    assert "channels-last" not in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_backbone_gives_the_eager_results(tiny_bert_dir, tmp_path):
    # Dropout draws its masks differently once compiled, so training curves are not
    # comparable step by step; what must hold: the compiled model computes what the eager
    # model with the same weights computes, and what it saves is an ordinary model.
    train = write_text_csv(tmp_path / "train.csv", n=32)
    val = write_text_csv(tmp_path / "val.csv", n=12, seed=5)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", data={"validation": str(val)},
                               train={"epochs": 2, "compile": True}))
    losses = _losses(run)
    assert losses and all(math.isfinite(x) for x in losses)
    from tuneforge.deploy.evaluate import evaluate_run

    eager = evaluate_run(run.path, str(val))  # the saved weights, loaded without compile
    assert eager["loss"] == pytest.approx(run.metrics["validation"]["loss"], rel=1e-4)
    assert eager["accuracy"] == run.metrics["validation"]["accuracy"]
    saved = load_file(str(run.path / "model" / "backbone" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in saved)  # compiled in place: names unchanged


def test_depthwise_convolutions_are_detected():
    from torch import nn

    from tuneforge.engine.precision import has_depthwise_conv

    assert has_depthwise_conv(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)))
    assert not has_depthwise_conv(nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3, groups=4), nn.Linear(4, 4)))
    assert not has_depthwise_conv(nn.Sequential(nn.Conv2d(1, 1, 3, groups=1)))  # one channel: an ordinary conv


@pytest.mark.parametrize("precision,expected", [("auto", "fp32"), ("bf16", "bf16")])
def test_auto_precision_keeps_depthwise_cnns_in_fp32_on_cpu(precision, expected, tiny_timm_weights, tmp_path,
                                                            monkeypatch, capsys):
    from tuneforge.engine import precision as prec

    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)  # as on an AVX-512 BF16 / AMX CPU
    train = write_image_folder(tmp_path / "images", n_per_class=4)
    run = finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run",
                                train={"epochs": 1, "precision": precision}))
    assert json.loads((run.path / "manifest.json").read_text())["precision"] == expected
    assert ("depthwise convolutions train slower in bf16" in capsys.readouterr().err) == (precision == "auto")


def test_auto_precision_still_picks_bf16_for_a_text_model(tiny_bert_dir, tmp_path, monkeypatch):
    from tuneforge.engine import precision as prec

    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    train = write_text_csv(tmp_path / "train.csv", n=16)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1, "precision": "auto"}))
    assert json.loads((run.path / "manifest.json").read_text())["precision"] == "bf16"


def test_image_loading_stays_in_the_main_process_on_cpu(monkeypatch):
    from tuneforge.tasks.image_classification import default_workers

    assert default_workers("cpu") == 0
    assert default_workers("auto") == (1 if torch.cuda.is_available() and (__import__("os").cpu_count() or 1) >= 2 else 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert default_workers("cuda") == 1  # a GPU computes while one worker prepares the next batch
