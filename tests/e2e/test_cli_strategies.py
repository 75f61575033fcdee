"""Each strategy on each task, end to end through the CLI, with tiny models."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge.cli import main

STRATEGIES = ["full", "linear-probe", "partial", "lora", "gradual-unfreeze", "auto"]


@pytest.fixture(scope="module")
def text_train(tmp_path_factory):
    return write_text_csv(tmp_path_factory.mktemp("text") / "train.csv", n=40)


@pytest.fixture(scope="module")
def image_train(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "train", n_per_class=6)


def _train(tmp_path, recipe: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path), "--set", "strategy.name=" + recipe["strategy"]["name"]])
    return code, capsys.readouterr()


def _check_run_dir(run, strategy):
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "eval.json", "model/tuneforge.json",
                 "model/labels.json", "checkpoints/best/trainable.safetensors"):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["data"]["train"]["sha256"] and manifest["data"]["train"]["rows_read"] > 0
    assert "torch" in manifest["packages"] and manifest["seed"] == 42
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["strategy"]["name"] == strategy and resolved["train"]["weight_decay"] == 0.01
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {e["event"] for e in events}
    final = json.loads((run / "eval.json").read_text())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "confusion_matrix"):
        assert key in final["validation"]
    assert sum(map(sum, final["validation"]["confusion_matrix"])) == final["validation"]["examples"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_text_strategy_end_to_end(strategy, tiny_bert_dir, text_train, tmp_path, capsys):
    run = tmp_path / "run"
    code, out = _train(tmp_path, text_recipe(tiny_bert_dir, text_train, run, strategy), capsys)
    assert code == 0, out.err
    assert out.out.strip().endswith(str(run))
    assert "trainable" in out.err and "parameters" in out.err
    _check_run_dir(run, strategy)
    code = main(["predict", str(run), "good fun film", "awful boring plot"])
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(preds) == 2 and all(p["label"] in ("pos", "neg") for p in preds)
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-4 for p in preds)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_image_strategy_end_to_end(strategy, tiny_timm_weights, image_train, tmp_path, capsys):
    run = tmp_path / "run"
    code, out = _train(tmp_path, image_recipe(tiny_timm_weights, image_train, run, strategy), capsys)
    assert code == 0, out.err
    _check_run_dir(run, strategy)
    code = main(["predict", str(run), "--file", str(image_train)])
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(preds) == 12 and all(p["label"] in ("red", "blue") for p in preds)


def test_frozen_parameters_bit_identical(tiny_bert_dir, text_train, tmp_path):
    """partial with layers=1: embeddings and layer 0 untouched, layer 1 changed."""
    from tuneforge import finetune

    run = finetune(text_recipe(tiny_bert_dir, text_train, tmp_path / "run", "partial",
                               strategy={"layers": 1}, train={"lr": 1e-2}))
    before = load_file(str(tiny_bert_dir / "model.safetensors"))
    after = load_file(str(run.path / "model" / "backbone" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("embeddings.", "encoder.layer.0."))]
    trained = [k for k in before if k.startswith("encoder.layer.1.") and k.endswith("weight")]
    assert frozen and trained
    for k in frozen:
        assert before[k].equal(after[k]), k
    assert any(not before[k].equal(after[k]) for k in trained)


def test_linear_probe_keeps_batchnorm_statistics(tiny_timm_weights, image_train, tmp_path):
    import tuneforge
    from tuneforge import finetune

    run = finetune(image_recipe(tiny_timm_weights, image_train, tmp_path / "run", "linear-probe"))
    before = load_file(str(tiny_timm_weights[1]))
    # the best checkpoint holds every buffer beside the trained head: the statistics did not move
    after = load_file(str(run.path / "checkpoints" / "best" / "trainable.safetensors"))
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        assert before[k].equal(after["backbone." + k]), k
    # so the saved model is the head on the referenced base weights, and reloads to the same backbone
    assert not (run.path / "model" / "model.safetensors").exists()
    state = tuneforge.load(run.path).model.backbone.state_dict()
    assert all(before[k].equal(state[k]) for k in before)


def test_lora_adapter_reload_identical_and_loads_with_peft(tiny_bert_dir, text_train, tmp_path):
    import torch
    from peft import PeftModel

    import tuneforge
    from tuneforge.models import load_model
    from tuneforge.tasks import LabelMap
    from tuneforge.tasks.base import Classifier

    run = tuneforge.finetune(text_recipe(tiny_bert_dir, text_train, tmp_path / "run", "lora",
                                         train={"lr": 1e-2}))
    texts = ["good fun film", "awful boring plot", "the movie was really great"]
    first = run.predict(texts)
    again = tuneforge.load(run.path).predict(texts)
    assert first == again
    assert (run.path / "model" / "adapter" / "adapter_config.json").exists()
    # Plain peft on the same base gives the same logits as tuneforge's predictor.
    labels = LabelMap.from_json(json.loads((run.path / "model" / "labels.json").read_text()))
    loaded = load_model(str(tiny_bert_dir))
    base = Classifier(loaded.backbone, loaded.info.feature_dim, len(labels), "text")
    peft_model = PeftModel.from_pretrained(base, str(run.path / "model" / "adapter")).eval()
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        probs = torch.softmax(peft_model(**enc), -1)
    expected = torch.tensor([[p["scores"][n] for n in labels.names] for p in first])
    assert torch.allclose(probs, expected, atol=1e-5)


def test_integer_labels_survive_round_trip(tiny_bert_dir, tmp_path):
    import tuneforge

    train = write_text_csv(tmp_path / "train.csv", n=40, labels=(1, 0))
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full"))
    labels = json.loads((run.path / "model" / "labels.json").read_text())
    assert labels == {"names": ["0", "1"], "kind": "int", "multi_label": False}
    preds = tuneforge.load(run.path).predict(["good fun"])
    assert isinstance(preds[0]["label"], int)


def test_multi_label_text(tiny_bert_dir, tmp_path):
    import tuneforge

    rows = ["text\tlabel"] + [f"good fun film {i}\tpositive|fun" if i % 2 else f"awful plot {i}\tnegative"
                             for i in range(30)]
    (tmp_path / "ml.tsv").write_text("\n".join(rows) + "\n")
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, tmp_path / "ml.tsv", tmp_path / "run", "full",
                                         task={"multi_label": True, "label_separator": "|"}))
    assert {"subset_accuracy", "f1_micro", "f1_per_label"} <= set(run.metrics["validation"])
    assert isinstance(run.predict(["good fun"])[0]["label"], list)


def test_tiny_text_model_learns(tiny_bert_dir, tmp_path):
    """A sanity check that the loop optimises: separable data reaches high accuracy."""
    import tuneforge

    train = write_text_csv(tmp_path / "train.csv", n=80)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                                         train={"epochs": 8, "lr": 3e-3}))
    assert run.metrics["validation"]["accuracy"] >= 0.9
