"""Recipe files are read strictly (``yaml_safe``): what plain YAML loading gets silently wrong
is an error that names the lines (issue 22)."""

from __future__ import annotations

import time

import pytest

from tuneforge.cli import main
from tuneforge.errors import TuneforgeError
from tuneforge.recipe import load_recipe


def _write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_section_twice_is_an_error_with_both_lines(tmp_path, capsys):
    path = _write(tmp_path, "model:\n  name: minilm-l6\ntrain:\n  lr: 0.1\ntrain:\n  epochs: 1\n")
    with pytest.raises(TuneforgeError, match=r"duplicate key 'train' at lines 3 and 5"):
        load_recipe(path)
    assert main(["validate", str(path)]) == 2  # it used to say "valid", keeping the last train:
    assert "duplicate key 'train'" in capsys.readouterr().err
    # anywhere in the recipe, also inside a section and in flow style
    nested = _write(tmp_path, "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "nested.yaml")
    with pytest.raises(TuneforgeError, match=r"nested.yaml: duplicate key 'train.lr' at lines 2 and 4"):
        load_recipe(nested)
    with pytest.raises(TuneforgeError, match=r"duplicate key 'data.columns.validation.text_column' at line 1"):
        load_recipe(_write(tmp_path, "data: {columns: {validation: {text_column: a, text_column: b}}}\n", "f.yaml"))
    # `tuneforge compare` reads its recipe file the same way
    from tuneforge.workflows.compare import compare

    with pytest.raises(TuneforgeError, match="duplicate key 'train'"):
        compare(path, "full", output=tmp_path / "cmp", isolate=False)
    # a merge key's values may still be overridden: that is what `<<` is for
    base = _write(tmp_path, "train:\n  <<: {lr: 0.1, epochs: 2}\n  lr: 0.2\n", "merge.yaml")
    assert load_recipe(base).train.lr == 0.2 and load_recipe(base).train.epochs == 2


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n", "---\n"],
                         ids=["empty", "blank", "comment", "empty-mapping", "empty-document"])
def test_an_empty_recipe_file_is_not_valid(tmp_path, capsys, text):
    path = _write(tmp_path, text)
    with pytest.raises(TuneforgeError, match=r"r.yaml is empty: a recipe names at least its data"):
        load_recipe(path)
    assert main(["validate", str(path)]) == 2
    assert load_recipe({}).model.name  # a recipe built in Python may still lean on every default


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    # 9 aliases of 9 aliases ... : 9**6 = 531,441 values from a few hundred bytes, where the old
    # loader expanded them into the error message about train.lr
    lines = ["train:", "  lr:", '    - &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"    - &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 6)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(TuneforgeError, match=r"expands to more than 100,000 values through its aliases "
                                             r"\(its aliases start at line 4\)"):
        load_recipe(path)
    assert time.perf_counter() - t0 < 1.0
    # and one that contains itself: an endless value
    with pytest.raises(TuneforgeError, match=r"the anchor at line 1 contains an alias of itself \(at train.x\)"):
        load_recipe(_write(tmp_path, "train: &t\n  x: *t\n", "self.yaml"))
