"""Activation caching gives the results of running the frozen backbone every time,
and any change of data, model or preprocessing invalidates it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import finetune


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "activations"


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _compare(cached, plain, head_file):
    a = load_file(str(cached.path / "model" / head_file))
    b = load_file(str(plain.path / "model" / head_file))
    for k in b:
        key = k if k in a else k
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert _losses(cached.path) == pytest.approx(_losses(plain.path), rel=1e-4, abs=1e-5)
    assert cached.metrics["validation"]["accuracy"] == plain.metrics["validation"]["accuracy"]
    assert cached.metrics["validation"]["loss"] == pytest.approx(plain.metrics["validation"]["loss"], rel=1e-4)


def test_text_cached_equals_uncached(tiny_bert_dir, tmp_path, private_cache):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    runs = {}
    for mode in ("auto", "off"):
        runs[mode] = finetune(text_recipe(tiny_bert_dir, train, tmp_path / mode, "linear-probe",
                                          train={"epochs": 3, "lr": 1e-2, "cache_activations": mode}))
    assert len(list(private_cache.glob("*.npy"))) == 2  # train + validation features
    _compare(runs["auto"], runs["off"], "trainable.safetensors")  # linear-probe saves the head on the base


def test_image_cached_equals_uncached(tiny_timm_weights, tmp_path, private_cache):
    train = write_image_folder(tmp_path / "images", n_per_class=8)
    runs = {}
    for mode in ("auto", "off"):
        runs[mode] = finetune(image_recipe(tiny_timm_weights, train, tmp_path / mode, "linear-probe",
                                           data={"augment": False}, train={"cache_activations": mode}))
    # the best checkpoints: the trained head and every buffer (BatchNorm statistics) of the backbone
    a = load_file(str(runs["auto"].path / "checkpoints" / "best" / "trainable.safetensors"))
    b = load_file(str(runs["off"].path / "checkpoints" / "best" / "trainable.safetensors"))
    assert any(k.endswith("running_mean") for k in b) and "task_head.weight" in b
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert _losses(runs["auto"].path) == pytest.approx(_losses(runs["off"].path), rel=1e-4, abs=1e-5)


def test_augmentation_turns_caching_off(tiny_timm_weights, tmp_path, private_cache):
    train = write_image_folder(tmp_path / "images", n_per_class=6)
    finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run", "linear-probe", data={"augment": True}))
    assert not private_cache.exists() or not list(private_cache.glob("*.npy"))


def test_changes_invalidate_the_cache(tiny_bert_dir, tmp_path, private_cache):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    val = write_text_csv(tmp_path / "val.csv", n=10, seed=3)

    def run(name, model_dir=tiny_bert_dir, train_file=train, **task):
        finetune(text_recipe(model_dir, train_file, tmp_path / name, "linear-probe", train={"epochs": 1},
                             data={"validation": str(val)}, task=task))
        return {p.name for p in private_cache.glob("*.npy")}

    first = run("a")
    assert len(first) == 2
    assert run("b") == first  # same model, data and preprocessing: reused
    other_data = write_text_csv(tmp_path / "train2.csv", n=40, seed=9)
    after_data = run("c", train_file=other_data)
    assert len(after_data - first) == 1  # new train features; validation unchanged and reused
    after_prep = run("d", max_length=8)
    assert len(after_prep - after_data) == 2
    changed = tmp_path / "model2"
    shutil.copytree(tiny_bert_dir, changed)
    weights = load_file(str(changed / "model.safetensors"))
    name = next(k for k in weights if "layer.1.output.dense.weight" in k)
    weights[name] = weights[name] + 0.01
    save_file(weights, str(changed / "model.safetensors"))
    after_model = run("e", model_dir=changed)
    assert len(after_model - after_prep) == 2
