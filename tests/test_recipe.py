from pathlib import Path

import pytest
import yaml

from tuneforge.errors import TuneforgeError
from tuneforge.recipe import describe_fields, load_recipe, parse_override
from tuneforge.strategies import options_class, strategy_names

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_shipped_recipes_exist_and_validate():
    assert len(RECIPES) >= 2
    for path in RECIPES:
        text = path.read_text()
        assert text.startswith("#") and "tuneforge " in text.splitlines()[1] + text.splitlines()[2], path
        recipe = load_recipe(path)
        assert recipe.model.name


def test_typo_suggests_nearest_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-4, "epocs": 2}}))
    with pytest.raises(TuneforgeError, match=r"train.epocs.*did you mean 'epochs'"):
        load_recipe(path)


def test_nested_and_strategy_typos():
    with pytest.raises(TuneforgeError, match=r"strategy.rnak.*did you mean 'rank'"):
        load_recipe({"strategy": {"name": "lora", "rnak": 4}})
    with pytest.raises(TuneforgeError, match=r"unknown strategy 'lroa'.*did you mean 'lora'"):
        load_recipe({"strategy": {"name": "lroa"}})
    with pytest.raises(TuneforgeError, match=r"data.columns.validation.txt_column.*did you mean 'text_column'"):
        load_recipe({"data": {"columns": {"validation": {"txt_column": "content"}}}})


def test_wrong_type_names_field_and_value():
    with pytest.raises(TuneforgeError) as err:
        load_recipe({"train": {"batch_size": "big", "lr": -1}})
    text = str(err.value)
    assert "train.batch_size" in text and "'big'" in text and "train.lr" in text


def test_overrides_parse_yaml_scalars():
    assert parse_override("train.lr=3e-5") == (["train", "lr"], 3e-5)
    assert parse_override("strategy.targets=[query, value]") == (["strategy", "targets"], ["query", "value"])
    recipe = load_recipe({}, ["train.lr=3e-5", "strategy.name=partial", "strategy.layers=1"])
    assert recipe.train.lr == 3e-5 and recipe.strategy.layers == 1
    with pytest.raises(TuneforgeError, match="key.path=value"):
        parse_override("train.lr")


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(TuneforgeError, match="line"):
        load_recipe(path)


def test_impossible_combination_is_explained():
    with pytest.raises(TuneforgeError, match="multi_label"):
        load_recipe({"task": {"type": "image-classification", "multi_label": True}})


def test_every_field_is_documented_with_default():
    rows = describe_fields()
    assert len(rows) > 40
    undocumented = [key for key, _, desc in rows if not desc]
    assert not undocumented
    for name in strategy_names():
        for field_name, field in options_class(name).model_fields.items():
            assert field.description, (name, field_name)


def test_resolved_recipe_round_trips():
    recipe = load_recipe({"strategy": {"name": "lora", "rank": 4}})
    again = load_recipe(recipe.dump())
    assert again.dump() == recipe.dump()
    assert again.strategy.rank == 4


def test_options_reference_is_up_to_date():
    from tuneforge.cli import options_markdown

    docs = Path(__file__).parent.parent / "docs" / "recipe.md"
    assert docs.read_text() == options_markdown(), "regenerate: tuneforge options > docs/recipe.md"
