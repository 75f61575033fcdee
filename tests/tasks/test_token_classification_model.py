"""Sub-word alignment (first vs all sub-tokens), long sentences in overlapping windows merged
back into one score per word, and the loss each alignment sums."""

from __future__ import annotations

import pytest
import torch

from tagging_helpers import tagger_bert_dir, tagging_recipe, write_conll  # noqa: F401 (fixture)
from tuneforge.errors import TuneforgeError
from tuneforge.models import load_model
from tuneforge.recipe import load_recipe
from tuneforge.tasks import get_task


def _task(model_dir, train, **task):
    recipe = load_recipe(tagging_recipe(model_dir, train, "unused", task={"type": "token-classification", **task}))
    t = get_task(recipe)
    records = t.read("train", str(train), limit=None, skipped=[])
    loaded = load_model(str(model_dir))
    t.attach(loaded)
    labels = t.label_map(records)
    return t, records, labels, t.build_model(loaded, labels).eval()


@pytest.fixture(scope="module")
def long_train(tmp_path_factory):
    return write_conll(tmp_path_factory.mktemp("tag") / "train.txt", n=12, clauses=(3, 4))


def test_first_and_all_subtoken_alignment(tagger_bert_dir, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Mary B-PER\nvisited O\nLondoners B-LOC\n")  # Londoners -> london ##ers
    first, records, labels, model = _task(tagger_bert_dir, path)
    ds = first.dataset(records, labels, "train")
    assert ds.items[0]["first"] == [0, 1, 2] and len(ds.items[0]["ids"]) == 4
    batch = first.collate([ds[0]])
    assert batch["input_ids"].shape == (1, 6)  # [CLS] mary visited london ##ers [SEP]
    assert batch["word_index"].tolist() == [[0, 1, 0, 0], [0, 2, 0, 1], [0, 3, 0, 2]]
    out = first.forward(model, batch)
    assert int(out["count"]) == 3 and out["logits"].shape == (1, 3, len(labels))
    every, records, labels, _ = _task(tagger_bert_dir, path, subtokens="all")
    batch = every.collate([every.dataset(records, labels, "train")[0]])
    names = [labels.names[i] if i >= 0 else None for i in batch["piece_labels"][0].tolist()]
    assert names == [None, "B-PER", "O", "B-LOC", "I-LOC", None]  # the later piece of B-LOC learns I-LOC
    out = every.forward(model, batch)
    assert int(out["count"]) == 4
    tokens = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = torch.nn.functional.cross_entropy(tokens[0, 1:5], batch["piece_labels"][0, 1:5], reduction="sum")
    assert torch.allclose(out["loss_sum"], expected)


def test_long_sentences_windowed_and_merged(tagger_bert_dir, long_train):
    task, records, labels, model = _task(tagger_bert_dir, long_train, max_length=10, stride=3)
    ds = task.dataset(records, labels, "train")
    room = task.window
    assert room == 8 and task.windowed["train"] == len(records)  # every 3-4 clause sentence is longer than 8 pieces
    for item in ds.items:
        n = len(item["ids"])
        spans = task.windows(n)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(e - s == room for s, e in spans)
        assert all(a[1] - b[0] >= 3 for a, b in zip(spans, spans[1:]))  # consecutive windows overlap by >= stride
    batch = task.collate([ds[i] for i in range(4)])
    with torch.no_grad():
        words = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "word_index", "word_count")})
    # the reference, computed apart: each window alone through the model, each word's first piece
    # read from the window where it has the most context on both sides
    before = 1  # [CLS]
    for b in range(4):
        item = ds.items[b]
        spans = task.windows(len(item["ids"]))
        logits = []
        for s, e in spans:
            ids = torch.tensor([[2] + item["ids"][s:e] + [3]])
            with torch.no_grad():
                logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids))[0])
        for w, p in enumerate(item["first"]):
            best = max(range(len(spans)), key=lambda k: (min(p - spans[k][0], spans[k][1] - 1 - p)
                                                         if spans[k][0] <= p < spans[k][1] else -1, -k))
            assert torch.allclose(words[b, w], logits[best][before + p - spans[best][0]], atol=1e-5)
        assert int(batch["word_count"][b]) == len(item["first"])


def test_a_fitting_sentence_is_one_window(tagger_bert_dir, long_train):
    task, records, labels, model = _task(tagger_bert_dir, long_train)
    ds = task.dataset(records, labels, "train")
    batch = task.collate([ds[0]])
    assert batch["input_ids"].shape[0] == 1 and task.windowed["train"] == 0


def test_stride_must_fit_the_window(tagger_bert_dir, long_train):
    task, records, labels, _ = _task(tagger_bert_dir, long_train, max_length=10, stride=8)
    with pytest.raises(TuneforgeError, match=r"task.stride 8 must be smaller than a window's 8 sub-tokens"):
        task.dataset(records, labels, "train")


def test_raw_strings_become_words_with_offsets(tagger_bert_dir, long_train):
    task, records, labels, model = _task(tagger_bert_dir, long_train, max_length=10, stride=2)
    texts = ["Mary went to New York, and John Smith met with Acme Corp today.", "", ["Mary", "saw", "Rome"]]
    batch = task.encode_inputs(texts)
    assert batch["word_count"].tolist() == [15, 0, 3]
    with torch.no_grad():
        probs = task.probabilities(model(**batch))
    out = task.format_predictions(probs, labels, texts)
    tokens = out[0]["tokens"]
    assert [t["text"] for t in tokens][:6] == ["Mary", "went", "to", "New", "York", ","]
    assert all(texts[0][t["start"]:t["end"]] == t["text"] for t in tokens)
    assert out[1] == {"entities": [], "tokens": []}
    assert [t["start"] for t in out[2]["tokens"]] == [0, 5, 9]  # a list of words: offsets into "Mary saw Rome"
    for e in out[0]["entities"]:
        assert texts[0][e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    with pytest.raises(TuneforgeError, match="a string or a list of words"):
        task.encode_inputs([3])
