"""Tasks and strategies register like PEFT methods: one module, one validated registration.

``task.type`` selects a task's own options (an option of another task is an unknown key with
a suggestion), a throw-away task or strategy needs nothing but its registration, and runs
saved before each task owned its options (one flat ``task:`` block) keep loading.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from tuneforge.cli import options_markdown
from tuneforge.errors import TuneforgeError
from tuneforge.recipe import describe_fields, from_run_config, load_recipe, recipe_from_dict, run_config_data
from tuneforge.strategies import get_strategy, options_class, register, strategy_class, strategy_names, unregister
from tuneforge.strategies.options import StrategyOptions
from tuneforge.tasks import (TaskOptions, get_task, register_task, task_class, task_names, task_options_class,
                             unregister_task)
from tuneforge.tasks.options import TYPE_DOC, task_block_from_saved

SRC = Path(__file__).resolve().parents[2] / "src" / "tuneforge"
BUILTIN_TASKS = ["causal-lm", "grpo", "image-classification", "preference", "text-classification",
                 "token-classification"]

# `Recipe().dump()["task"]` before each task owned its options: what every older run saved.
LEGACY_TASK = {
    "type": "text-classification", "format": "auto", "chat_template": "auto", "train_on": "completion",
    "packing": True,
    "generation": {"eval_prompts": 32, "max_new_tokens": 64, "sampled": True, "temperature": 0.7, "top_p": 0.9},
    "loss": "dpo", "beta": 0.1, "simpo_gamma": 0.5, "classifier": "head", "label_prompt": "\nLabel:",
    "label_words": {}, "multi_label": False, "label_separator": ",", "max_length": None, "truncation": "truncate",
    "pooling": "mean", "image_size": None, "head_dropout": 0.1,
}


# --------------------------------------------------------------------------- options per task

def test_builtin_tasks_are_discovered_and_own_their_keys():
    assert task_names() == BUILTIN_TASKS
    keys = {name: set(task_options_class(name).model_fields) for name in task_names()}
    assert keys["image-classification"] == {"type", "image_size", "head_dropout"}
    assert keys["causal-lm"] == {"type", "format", "chat_template", "train_on", "packing", "generation", "max_length"}
    assert keys["preference"] == {"type", "chat_template", "generation", "loss", "beta", "simpo_gamma", "max_length",
                                  "reference"}
    assert "packing" not in keys["text-classification"] and "pooling" in keys["text-classification"]
    assert keys["grpo"] >= {"type", "chat_template", "rewards", "reward_paths", "group_size", "beta", "max_length"}
    # the tasks of the old flat block hold exactly its fields, each with its old default (tasks added
    # since then, such as grpo and token-classification, bring their own)
    legacy = ["causal-lm", "image-classification", "preference", "text-classification"]
    added = {"reference"}  # fields added to the old tasks since (preference's reference model, issue 15)
    assert set().union(*(keys[n] for n in legacy)) - added == set(LEGACY_TASK)
    for name in task_names():
        if name in legacy:
            dumped = load_recipe({"model": {"name": "efficientnet-lite0" if name == "image-classification" else "/llm"},
                                  "task": {"type": name}}).dump()["task"]
            if "generation" in dumped:  # generation options added since (group_by) keep out of the old block
                dumped["generation"] = {k: v for k, v in dumped["generation"].items() if k in LEGACY_TASK["generation"]}
            assert all(dumped.pop(k) is None for k in added if k in dumped)  # off unless set
            assert dumped == {k: v for k, v in LEGACY_TASK.items() if k in dumped} | {"type": name}
        for field_name, field in task_options_class(name).model_fields.items():
            assert field.description and "\n" not in field.description, (name, field_name)


def test_option_of_another_task_is_an_error_naming_the_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "efficientnet-lite0"},
                                    "task": {"type": "image-classification", "packing": False}}))
    expected = (r"unknown recipe key 'task.packing' \('packing' is an option of task causal-lm\); valid keys here "
                r"\(for task 'image-classification'\) are: type, image_size, head_dropout")
    with pytest.raises(TuneforgeError, match=expected):
        load_recipe(path)
    image = tmp_path / "image.yaml"
    image.write_text(yaml.safe_dump({"model": {"name": "efficientnet-lite0"}, "task": {"type": "image-classification"}}))
    with pytest.raises(TuneforgeError, match=expected):
        load_recipe(image, ["task.packing=false"])
    with pytest.raises(TuneforgeError, match=r"task.max_lenght' \(did you mean 'max_length'\?\)"):
        load_recipe({}, ["task.max_lenght=64"])
    with pytest.raises(TuneforgeError, match=r"'task.multi_label'.*option of task text-classification"):
        load_recipe(image, ["task.multi_label=true"])  # multi-label images: simply not an image option
    with pytest.raises(TuneforgeError, match=r"unknown task 'causal_lm' \(did you mean 'causal-lm'\?\); choose "
                                             r"one of: causal-lm, grpo, image-classification, preference, text-classification, token-classification"):
        load_recipe({"task": {"type": "causal_lm"}})
    assert load_recipe(image, ["task.image_size=48"]).task.image_size == 48


def test_cross_section_rules_read_declared_capabilities():
    # the alternatives are read from the strategies' capabilities, not written out
    with pytest.raises(TuneforgeError, match=r"strategy gradual-unfreeze trains or schedules a new task head, and a "
                                             r"causal-lm run keeps the model's own LM head.* use adapters, bitfit, full"):
        load_recipe({"model": {"name": "/llm"}, "task": {"type": "causal-lm"}, "strategy": {"name": "gradual-unfreeze"}})
    with pytest.raises(TuneforgeError, match=r"load_in_4bit.*strategy.name: lora \(got full\)"):
        load_recipe({"model": {"name": "/llm", "load_in_4bit": True}})
    with pytest.raises(TuneforgeError, match=r"output.merge.*use strategy ia3 / lora"):
        load_recipe({"output": {"merge": True}})
    with pytest.raises(TuneforgeError, match=r"prompt-tuning works on text models only.*for image models use adapters"):
        load_recipe({"model": {"name": "efficientnet-lite0"}, "task": {"type": "image-classification"},
                     "strategy": {"name": "prompt-tuning"}})
    with pytest.raises(TuneforgeError, match=r"'perplexity' is not a single-label validation metric"):
        load_recipe({"train": {"metric_for_best": "perplexity"}})
    assert load_recipe({"model": {"name": "/llm"}, "task": {"type": "preference"},
                        "train": {"metric_for_best": "reward_margin"}}).train.minimize is False


def test_tasks_and_strategies_sit_below_the_recipe():
    for folder in ("tasks", "strategies"):
        for path in (SRC / folder).glob("*.py"):
            imports = re.findall(r"^\s*(?:from\s+(?:\.\.|tuneforge\.)recipe\s+import|import\s+tuneforge\.recipe)",
                                 path.read_text(), re.M)
            assert not imports, path
    # the schema modules are light: the recipe (and so `tuneforge validate`'s start) loads no torch
    code = "import sys, tuneforge.recipe, tuneforge.tasks.options, tuneforge.strategies.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from tuneforge.recipe import NAME_DOC, StrategyOptions as Reexported  # still the public face

    assert Reexported is StrategyOptions and "<strategies>" in NAME_DOC


# --------------------------------------------------------------------------- registration

class ToyRegressionOptions(TaskOptions):
    """A throw-away task: predicts one number per text."""

    type: str = Field("toy-regression", description=TYPE_DOC)
    its_option: int = Field(1, ge=0, description="How much toy there is.")


class ToyRegression:
    modality = ToyRegressionOptions.modality

    def __init__(self, recipe):
        self.recipe = recipe


@pytest.fixture
def toy_task():
    register_task("toy-regression", ToyRegressionOptions)(ToyRegression)
    yield ToyRegression
    unregister_task("toy-regression")


def test_a_throw_away_task_needs_only_its_registration(toy_task):
    recipe = load_recipe({"task": {"type": "toy-regression", "its_option": 3}})
    assert isinstance(recipe.task, ToyRegressionOptions) and recipe.task.its_option == 3
    assert recipe.train.metric_for_best == "loss"  # TaskOptions' default metrics
    task = get_task(recipe)
    assert isinstance(task, ToyRegression) and task.type == "toy-regression" and task_class("toy-regression") is ToyRegression
    assert load_recipe(recipe.dump()).dump() == recipe.dump()
    with pytest.raises(TuneforgeError, match=r"task.packing.*for task 'toy-regression'\) are: type, its_option"):
        load_recipe({"task": {"type": "toy-regression"}}, ["task.packing=false"])
    docs = options_markdown()
    assert "### `toy-regression`" in docs and "| `task.its_option` | `1` | How much toy there is. |" in docs
    type_doc = dict((k, d) for k, _, d in describe_fields())["task.type"]
    assert "text-classification, token-classification or toy-regression" in type_doc


def test_unregistered_task_is_gone(toy_task):
    unregister_task("toy-regression")
    with pytest.raises(TuneforgeError, match="unknown task 'toy-regression'"):
        load_recipe({"task": {"type": "toy-regression"}})
    assert "toy-regression" not in task_names()


def test_task_registration_validates():
    with pytest.raises(ValueError, match="already registered"):
        register_task("causal-lm", ToyRegressionOptions)(ToyRegression)
    for bad in ("Toy", "toy_regression", "toy--x", "-toy", ""):
        with pytest.raises(ValueError, match="lowercase words joined by '-'"):
            register_task(bad, ToyRegressionOptions)(ToyRegression)
    with pytest.raises(ValueError, match=r"ToyRegressionOptions.type must default to 'toy-other'"):
        register_task("toy-other", ToyRegressionOptions)(ToyRegression)
    with pytest.raises(TypeError, match="must subclass TaskOptions"):
        register_task("toy-regression", StrategyOptions)(ToyRegression)
    assert "toy-regression" not in task_names() and "toy-other" not in task_names()


class ToyFreezeOptions(StrategyOptions):
    """A throw-away strategy."""

    name: str = Field("toy-freeze", description="Which strategy.")
    depth: int = Field(2, ge=1, description="How deep the toy freezes.")


def test_a_throw_away_strategy_needs_only_its_registration():
    from tuneforge.strategies.base import FreezingStrategy

    @register("toy-freeze", ToyFreezeOptions)
    class ToyFreeze(FreezingStrategy):
        needs_task_head = True

    try:
        recipe = load_recipe({"strategy": {"name": "toy-freeze", "depth": 4}})
        assert isinstance(get_strategy(recipe.strategy), ToyFreeze) and recipe.strategy.depth == 4
        assert strategy_class("toy-freeze") is ToyFreeze and options_class("toy-freeze") is ToyFreezeOptions
        assert "| `strategy.depth` | `2` | How deep the toy freezes. |" in options_markdown()
        with pytest.raises(TuneforgeError, match=r"toy-freeze trains or schedules a new task head"):
            load_recipe({"model": {"name": "/llm"}, "task": {"type": "causal-lm"}, "strategy": {"name": "toy-freeze"}})
        with pytest.raises(ValueError, match="already registered"):
            register("toy-freeze", ToyFreezeOptions)(FreezingStrategy)
    finally:
        unregister("toy-freeze")
    assert "toy-freeze" not in strategy_names()
    with pytest.raises(ValueError, match="lowercase words"):
        register("Toy_Freeze", ToyFreezeOptions)(FreezingStrategy)
    with pytest.raises(ValueError, match="must default to 'lora-x'"):
        register("lora-x", ToyFreezeOptions)(FreezingStrategy)


# --------------------------------------------------------------------------- runs saved before the split

def test_flat_task_blocks_load_only_from_runs():
    with pytest.raises(TuneforgeError, match="unknown recipe key 'task.format'"):
        recipe_from_dict({"task": LEGACY_TASK})  # in a user's recipe, another task's key is an error
    assert from_run_config({"task": LEGACY_TASK}).dump()["task"] == load_recipe({}).dump()["task"]
    image = task_block_from_saved({**LEGACY_TASK, "type": "image-classification", "image_size": 32})
    assert image == {"type": "image-classification", "image_size": 32, "head_dropout": 0.1}
    lm = run_config_data({"task": {**LEGACY_TASK, "type": "causal-lm", "packing": False}, "train": {"lr": 1e-3}})
    assert lm["task"]["packing"] is False and "pooling" not in lm["task"] and lm["train"] == {"lr": 1e-3}
    assert task_block_from_saved({"type": "no-such-task", "x": 1}) == {"type": "no-such-task", "x": 1}


def test_a_run_saved_with_the_flat_block_still_loads_resumes_exports_and_reproduces(tiny_bert_dir, tmp_path):
    import tuneforge
    from helpers import text_recipe, write_text_csv
    from tuneforge.deploy.export.common import sample_inputs as _sample_inputs
    from tuneforge.deploy.predictor import Predictor
    from tuneforge.run.artifact import load_model_dir
    from tuneforge.run.resume import check_same_run
    from tuneforge.workflows.reproduce import reproduce

    train = write_text_csv(tmp_path / "train.csv", n=24)
    recipe = text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                         train={"deterministic": True, "max_steps": 3})
    run = tuneforge.finetune(recipe)
    texts = ["good great fun film", "bad awful film"]
    before = Predictor(run.path).predict(texts)
    # rewrite the run as an older tuneforge wrote it: every task's field in both task blocks
    config = yaml.safe_load((run.path / "config.yaml").read_text())
    config["task"] = dict(LEGACY_TASK)
    (run.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    meta_path = run.path / "model" / "tuneforge.json"
    meta = json.loads(meta_path.read_text())
    meta["task"] = dict(LEGACY_TASK)
    meta_path.write_text(json.dumps(meta, indent=2))

    model, task, labels, _ = load_model_dir(run.path)
    assert task.type == "text-classification"
    assert Predictor(run.path).predict(texts) == before
    check_same_run(run.path, load_recipe(recipe), {})  # resume accepts the old config
    inputs, _, where = _sample_inputs(run.path, task, 2)
    assert inputs["input_ids"].shape[0] == 2 and "rows of" in where
    result = reproduce(run.path, output=str(tmp_path / "again"))
    assert result["ok"] and result["expected"] == "identical", result
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert set(again["task"]) == set(task_options_class("text-classification").model_fields)
