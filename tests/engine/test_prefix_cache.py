"""Frozen-prefix caching (``partial``): replaying the cached output of the frozen
layers gives the results of running them every time, any change of data, model or
preprocessing invalidates the cache, and a model whose forward the replay cannot
reproduce trains without it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import finetune
from tuneforge.engine.prefix_cache import Replay, _probe


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "activations"


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


def _same_weights(a_run, b_run, rtol=1e-4, atol=1e-5):
    # the trained weights (top layers + head), as the best checkpoint holds them
    a = load_file(str(a_run.path / "checkpoints" / "best" / "trainable.safetensors"))
    b = load_file(str(b_run.path / "checkpoints" / "best" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


PARTIAL = {"name": "partial", "layers": 1}


def test_text_prefix_cache_equals_running_the_frozen_layers(tiny_bert_dir, tmp_path, private_cache):
    train = write_text_csv(tmp_path / "train.csv", n=48)
    runs = {}
    for mode in ("auto", "off"):
        runs[mode] = finetune(text_recipe(tiny_bert_dir, train, tmp_path / mode, strategy=PARTIAL,
                                          train={"epochs": 3, "cache_activations": mode}))
    assert len(list(private_cache.glob("prefix-*.npy"))) == 2  # train + validation
    _same_weights(runs["auto"], runs["off"])
    assert _losses(runs["auto"].path) == pytest.approx(_losses(runs["off"].path), rel=1e-4, abs=1e-5)
    for key in ("accuracy", "loss"):
        assert runs["auto"].metrics["validation"][key] == pytest.approx(runs["off"].metrics["validation"][key],
                                                                       rel=1e-4)
    # the frozen layers are bit-identical to the pretrained ones, the top layer trained
    start = load_file(str(tiny_bert_dir / "model.safetensors"))
    end = load_file(str(runs["auto"].path / "model" / "backbone" / "model.safetensors"))
    frozen = [k for k in start if "embeddings" in k or ".layer.0." in k]
    top = [k for k in start if ".layer.1." in k and k.endswith("weight")]
    assert frozen and top
    for k in frozen:
        assert torch.equal(start[k], end[k]), k
    assert any(not torch.equal(start[k], end[k]) for k in top)


def test_text_prefix_cache_bf16_close(tiny_bert_dir, tmp_path, private_cache):
    train = write_text_csv(tmp_path / "train.csv", n=48)
    runs = {mode: finetune(text_recipe(tiny_bert_dir, train, tmp_path / mode, strategy=PARTIAL,
                                       train={"epochs": 2, "cache_activations": mode, "precision": "bf16"}))
            for mode in ("auto", "off")}
    assert list(private_cache.glob("prefix-*.npy"))
    assert _losses(runs["auto"].path) == pytest.approx(_losses(runs["off"].path), rel=2e-2, abs=2e-2)
    assert runs["auto"].metrics["validation"]["loss"] == pytest.approx(runs["off"].metrics["validation"]["loss"],
                                                                       rel=2e-2)


def test_image_prefix_cache_equals_running_the_frozen_layers(tiny_timm_weights, tmp_path, private_cache):
    train = write_image_folder(tmp_path / "images", n_per_class=8)
    runs = {mode: finetune(image_recipe(tiny_timm_weights, train, tmp_path / mode, strategy=PARTIAL,
                                        data={"augment": False}, train={"cache_activations": mode}))
            for mode in ("auto", "off")}
    assert len(list(private_cache.glob("prefix-*.npy"))) == 2
    _same_weights(runs["auto"], runs["off"])
    assert _losses(runs["auto"].path) == pytest.approx(_losses(runs["off"].path), rel=1e-4, abs=1e-5)


def test_image_augmentation_turns_prefix_cache_off(tiny_timm_weights, tmp_path, private_cache):
    train = write_image_folder(tmp_path / "images", n_per_class=6)
    finetune(image_recipe(tiny_timm_weights, train, tmp_path / "run", strategy=PARTIAL,
                          data={"augment": True}, train={"epochs": 1}))
    assert not list(private_cache.glob("prefix-*.npy")) if private_cache.exists() else True


def test_changes_invalidate_the_prefix_cache(tiny_bert_dir, tmp_path, private_cache):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    val = write_text_csv(tmp_path / "val.csv", n=10, seed=3)

    def run(name, model_dir=tiny_bert_dir, train_file=train, layers=1, **task):
        finetune(text_recipe(model_dir, train_file, tmp_path / name, strategy={"name": "partial", "layers": layers},
                             train={"epochs": 1}, data={"validation": str(val)}, task=task))
        return {p.name for p in private_cache.glob("prefix-*.npy")}

    first = run("a")
    assert len(first) == 2
    assert run("b") == first  # same model, data and preprocessing: reused
    after_data = run("c", train_file=write_text_csv(tmp_path / "train2.csv", n=40, seed=9))
    assert len(after_data - first) == 1  # new train activations; validation reused
    after_prep = run("d", max_length=8)
    assert len(after_prep - after_data) == 2
    after_split = run("e", layers=2)  # a different frozen prefix (embeddings only)
    assert len(after_split - after_prep) == 2
    changed = tmp_path / "model2"
    shutil.copytree(tiny_bert_dir, changed)
    weights = load_file(str(changed / "model.safetensors"))
    name = next(k for k in weights if "layer.0.output.dense.weight" in k)
    weights[name] = weights[name] + 0.01
    save_file(weights, str(changed / "model.safetensors"))
    after_model = run("f", model_dir=changed)
    assert len(after_model - after_split) == 2


class _Chain(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, **_):
        return self.c(self.b(self.a(x) * self.scale))


@pytest.mark.parametrize("scale,replays", [(1.0, True), (2.0, False)])
def test_replay_reproduces_chains_and_exposes_work_between_layers(scale, replays):
    torch.manual_seed(0)
    model = _Chain(scale).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        order, skeleton, why = _probe(model, ["a", "b"], {"x": x})
        assert order == ["a", "b"] and not why
        cached = model.b(model.a(x) * scale)  # what the cache holds: the last frozen module's output
        expected = model(x)
        replay = Replay(model, order, skeleton)
        replay.install()
        got = model(torch.zeros(3, 4), prefix_activations=cached)
        replay.remove()
        assert torch.equal(model(x), expected)  # removed: the model's own forwards again
    # plain chains replay exactly; a scale between layers is caught by the logits check
    assert torch.allclose(got, expected) is replays
