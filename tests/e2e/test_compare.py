"""`tuneforge compare` on tiny models: one row per strategy, failures as rows, CSV and Markdown."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import compare
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError


def test_compare_in_process_rows_and_failure(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=32)
    # strategy.layers=9 is kept for partial (which fails: the tiny model has 3 layer groups) and
    # dropped for full and linear-probe, which do not take it.
    recipe = text_recipe(tiny_bert_dir, train, tmp_path / "ignored", "partial", strategy={"layers": 9},
                         train={"epochs": 1})
    result = compare(recipe, "full,linear-probe,partial", output=tmp_path / "cmp", isolate=False)
    rows = {r["strategy"]: r for r in result.rows}
    assert [r["strategy"] for r in result.rows] == ["full", "linear-probe", "partial"]
    assert rows["partial"]["status"] == "failed" and "strategy.layers is 9" in rows["partial"]["error"]
    full, probe = rows["full"], rows["linear-probe"]
    assert full["status"] == probe["status"] == "ok"
    assert probe["trainable_params"] == 32 * 2 + 2  # the head alone: feature_dim x classes + bias
    assert full["trainable_params"] == full["total_params"] > probe["trainable_params"]
    assert 0 <= full["accuracy"] <= 1 and full["samples_per_s"] > 0 and full["wall_s"] > 0
    assert probe["delta_bytes"] < full["delta_bytes"] and full["saved_bytes"] > 0
    assert "peak_rss_mb" not in full  # in-process: one peak for all runs, so none is reported
    with open(tmp_path / "cmp" / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == ["full", "linear-probe", "partial"]
    assert table[0]["trainable_params"] == str(full["trainable_params"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("\n") == 5 and "| full | ok |" in md and "strategy.layers is 9" in md
    assert (tmp_path / "cmp" / "full" / "manifest.json").exists()


@pytest.mark.slow  # one process per strategy: ~60 s on the shared 2-core machine
def test_compare_cli_isolated_with_gradual_and_auto(tiny_timm_weights, tmp_path, capsys):
    train = write_image_folder(tmp_path / "images", n_per_class=6)
    recipe = image_recipe(tiny_timm_weights, train, tmp_path / "ignored", "full", train={"epochs": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["compare", str(path), "--strategies", "gradual-unfreeze,auto", "--output", str(tmp_path / "cmp"),
                 "--set", "strategy.steps_per_stage=1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[1]["strategy"] == "auto -> partial"  # 9 training images, 4 steps: too few to fine-tune all
    assert float(rows[0]["peak_rss_mb"]) > 0  # its own process, its own peak
    events = (tmp_path / "cmp" / "gradual-unfreeze" / "metrics.jsonl").read_text()
    assert '"unfreeze"' in events
    assert str(tmp_path / "cmp" / "compare.md") in out.out


def test_compare_refuses_unknown_strategies_before_running(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=16)
    with pytest.raises(TuneforgeError, match="unknown strategy 'lroa'.*lora"):
        compare(text_recipe(tiny_bert_dir, train, tmp_path / "x"), "full,lroa", output=tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "full").exists()
