"""The parameter-efficient strategies end to end through the CLI on tiny models: train,
save, reload, predict; a reloaded run gives the in-process model's probabilities."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge.cli import main

TEXT = ["bitfit", "adapters", "ia3", "prompt-tuning", "prefix-tuning"]
IMAGE = {"bitfit": {}, "adapters": {"style": "pfeiffer", "reduction_factor": 2}, "ia3": {}}


@pytest.fixture(scope="module")
def text_train(tmp_path_factory):
    return write_text_csv(tmp_path_factory.mktemp("text") / "train.csv", n=40)


@pytest.fixture(scope="module")
def image_train(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "train", n_per_class=6)


def _train(tmp_path, recipe: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path)])
    return code, capsys.readouterr()


def _in_process_probs(run, inputs):
    """The trained model as the run held it (best checkpoint), rebuilt the way the pipeline builds it."""
    from tuneforge.engine.checkpoint import load_checkpoint_weights
    from tuneforge.models import load_model
    from tuneforge.recipe import load_recipe
    from tuneforge.deploy.predictor import Predictor
    from tuneforge.strategies import get_strategy
    from tuneforge.tasks import LabelMap, get_task

    recipe = load_recipe(run / "config.yaml")
    loaded = load_model(recipe.model.name, weights=recipe.model.weights)
    labels = LabelMap.from_json(json.loads((run / "model" / "labels.json").read_text()))
    task = get_task(recipe)
    task.attach(loaded)
    model = get_strategy(recipe.strategy).apply(task.build_model(loaded, labels), loaded.info)
    load_checkpoint_weights(run / "checkpoints" / "best", model)
    predictor = Predictor(run)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(**predictor.task.encode_inputs(inputs)), -1)
    return expected, predictor.predict_proba(inputs)


@pytest.mark.parametrize("strategy", TEXT)
def test_text_peft_strategy_end_to_end(strategy, tiny_bert_dir, text_train, tmp_path, capsys):
    run = tmp_path / "run"
    options = {"virtual_tokens": 4} if "tuning" in strategy else {}
    code, out = _train(tmp_path, text_recipe(tiny_bert_dir, text_train, run, strategy, strategy=options,
                                             train={"lr": 1e-2}), capsys)
    assert code == 0, out.err
    assert f"strategy {strategy}: trainable" in out.err
    meta = json.loads((run / "model" / "tuneforge.json").read_text())
    assert meta["layout"] == ("peft-adapter" if strategy == "ia3" else "base+trainable")
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    code = main(["predict", str(run), "good fun film", "awful boring plot"])
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(preds) == 2 and all(p["label"] in ("pos", "neg") for p in preds)
    texts = ["good fun film", "awful boring plot", "the movie was really great"]
    expected, reloaded = _in_process_probs(run, texts)
    assert torch.allclose(reloaded, expected, atol=1e-6)


def test_prompt_tuning_shortens_texts_to_fit_positions(tiny_bert_dir, text_train, tmp_path, capsys):
    """Through the Python API: the virtual tokens use up positions, so texts are cut to fit."""
    import tuneforge

    run = tuneforge.finetune(text_recipe(tiny_bert_dir, text_train, tmp_path / "run", "prompt-tuning",
                                         strategy={"virtual_tokens": 20}, train={"epochs": 1}))
    assert "task.max_length lowered from 64 to 44" in capsys.readouterr().err  # the tiny BERT has 64 positions
    assert json.loads((run.path / "model" / "tuneforge.json").read_text())["task_settings"]["max_length"] == 44
    long_text = " ".join(["good fun film"] * 30)  # 90 words: truncated to 44 tokens, no position overflow
    preds = run.predict([long_text, "awful"])
    assert len(preds) == 2 and preds == tuneforge.load(run.path).predict([long_text, "awful"])


@pytest.mark.parametrize("strategy", sorted(IMAGE))
def test_image_peft_strategy_end_to_end(strategy, tiny_timm_weights, image_train, tmp_path, capsys):
    run = tmp_path / "run"
    code, out = _train(tmp_path, image_recipe(tiny_timm_weights, image_train, run, strategy,
                                              strategy=IMAGE[strategy]), capsys)
    assert code == 0, out.err
    code = main(["predict", str(run), "--file", str(image_train)])
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(preds) == 12 and all(p["label"] in ("red", "blue") for p in preds)
    files = sorted(str(p) for p in image_train.rglob("*.png"))[:4]
    expected, reloaded = _in_process_probs(run, files)
    assert torch.allclose(reloaded, expected, atol=1e-6)


@pytest.mark.parametrize("kind,strategy", [("text", "lora"), ("image", "ia3"), ("image", "lora")])
def test_merge_on_save(kind, strategy, tiny_bert_dir, tiny_timm_weights, text_train, image_train, tmp_path, capsys):
    run = tmp_path / "run"
    extra = {"output": {"merge": True}, "strategy": {"dora": True} if strategy == "lora" else {}}
    recipe = (text_recipe(tiny_bert_dir, text_train, run, strategy, **extra) if kind == "text"
              else image_recipe(tiny_timm_weights, image_train, run, strategy, **extra))
    code, out = _train(tmp_path, recipe, capsys)
    assert code == 0, out.err
    assert "merge: max |merged - unmerged| logit =" in out.err and "tolerance 0.0001" in out.err
    report = json.loads((run / "eval.json").read_text())["merge"]
    assert report["scaled_diff"] <= 1e-4 and report["examples"] > 0
    meta = json.loads((run / "model" / "tuneforge.json").read_text())
    assert meta["layout"] == ("hf-backbone+head" if kind == "text" else "full-state")
    assert not (run / "model" / "adapter").exists()
    inputs = ["good fun film", "awful boring plot"] if kind == "text" else \
        sorted(str(p) for p in image_train.rglob("*.png"))[:4]
    expected, reloaded = _in_process_probs(run, inputs)  # unmerged, from the best checkpoint
    assert torch.allclose(reloaded, expected, atol=1e-4)


def test_bad_combinations_are_explained(tiny_timm_weights, image_train, tmp_path, capsys):
    code, out = _train(tmp_path, image_recipe(tiny_timm_weights, image_train, tmp_path / "r1", "prompt-tuning"), capsys)
    assert code == 2 and "prompt-tuning works on text models only" in out.err
    code, out = _train(tmp_path, image_recipe(tiny_timm_weights, image_train, tmp_path / "r2", "adapters"), capsys)
    assert code == 2 and "set strategy.style: pfeiffer" in out.err
    code, out = _train(tmp_path, image_recipe(tiny_timm_weights, image_train, tmp_path / "r3", "lora",
                                              strategy={"targets": ["nope"]}), capsys)
    assert code == 2 and "match no module" in out.err and "conv_stem" in out.err


def test_warm_start_from_adapters_run_is_refused(tiny_bert_dir, text_train, tmp_path, capsys):
    code, out = _train(tmp_path, text_recipe(tiny_bert_dir, text_train, tmp_path / "a", "adapters",
                                             train={"epochs": 1}), capsys)
    assert code == 0, out.err
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, text_train, tmp_path / "b", "full")))
    code = main(["train", str(path), "--init-from", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "adapters or virtual tokens" in err and ".adapter." in err
