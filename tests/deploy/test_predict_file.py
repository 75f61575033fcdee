"""Batch prediction streams in batches, keeps ids, agrees with one-by-one prediction, and a
bad record is reported (or stops the run) without losing what was already written."""

from __future__ import annotations

import json

import pytest

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import TuneforgeError, finetune, load
from tuneforge.cli import main
from tuneforge.deploy.predict import predict_file


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_text")
    train = write_text_csv(tmp / "train.csv", n=32)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 1})).path


@pytest.fixture(scope="module")
def image_run(tiny_timm_weights, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_image")
    train = write_image_folder(tmp / "images", n_per_class=4)
    return finetune(image_recipe(tiny_timm_weights, train, tmp / "run", train={"epochs": 1})).path, train


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_equals_one_by_one_with_ids(text_run, tmp_path):
    f = tmp_path / "in.jsonl"
    texts = [f"{'good ' * (i % 5)}film number {i} {'bad' if i % 3 else ''}" for i in range(23)]
    f.write_text("\n".join(json.dumps({"key": f"k{i}", "text": t}) for i, t in enumerate(texts)) + "\n")
    out = tmp_path / "preds.jsonl"
    counts = predict_file(text_run, str(f), str(out), id_column="key", batch_size=5, progress=False)
    rows = _rows(out)
    assert counts == {"predicted": 23, "errors": 0, "skipped_rows": 0}
    assert [r["id"] for r in rows] == [f"k{i}" for i in range(23)]
    single = load(text_run)
    for r, t in zip(rows, texts):
        expected = single.predict([t])[0]
        assert r["label"] == expected["label"]
        assert r["scores"] == pytest.approx(expected["scores"], abs=1e-5)


def test_bad_image_is_reported_and_the_rest_predicted(image_run, tmp_path):
    run, train = image_run
    folder = tmp_path / "todo"
    folder.mkdir()
    good = sorted(train.rglob("*.png"))[:5]
    for i, p in enumerate(good):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "2b.png").write_bytes(b"not an image at all")
    out = tmp_path / "preds.jsonl"
    counts = predict_file(run, str(folder), str(out), batch_size=4, progress=False)
    rows = _rows(out)
    assert counts["predicted"] == 5 and counts["errors"] == 1
    errors = [r for r in rows if "error" in r]
    assert len(errors) == 1 and errors[0]["id"].endswith("2b.png") and "cannot read image" in errors[0]["error"]
    assert all("label" in r for r in rows if "error" not in r)


def test_stop_on_error_keeps_what_was_written(image_run, tmp_path):
    run, train = image_run
    folder = tmp_path / "todo"
    folder.mkdir()
    for i, p in enumerate(sorted(train.rglob("*.png"))[:6]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "4b.png").write_bytes(b"")  # sorts after 4.png: the second batch of 4
    out = tmp_path / "preds.jsonl"
    with pytest.raises(TuneforgeError, match="stopped"):
        predict_file(run, str(folder), str(out), batch_size=4, on_error="stop", progress=False)
    rows = _rows(out)
    assert sum("label" in r for r in rows) >= 4  # the first batch survived
    assert rows[-1]["id"].endswith("4b.png") and "error" in rows[-1]


def test_malformed_rows_are_reported_not_fatal(text_run, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "good film"}\n{"text": \n{"text": "bad film"}\n')
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(text_run), "--file", str(f), "--out", str(out)]) == 0
    rows = _rows(out)
    assert sum("label" in r for r in rows) == 2 and sum("error" in r for r in rows) == 1
