"""Reading tagging data: CoNLL columns, JSON lines of words or of character spans, and bad
input that names the file, the line and the fix."""

from __future__ import annotations

import json

import pytest

from tagging_helpers import write_conll, write_span_jsonl, write_token_jsonl
from tuneforge.data.tagging import TaggedReader, split_words
from tuneforge.errors import TuneforgeError
from tuneforge.recipe import load_recipe


def _opts(**task):
    return load_recipe({"task": {"type": "token-classification", **task}}).task


def _read(path, on_bad="error", skipped=None, **task):
    messages = []
    records = TaggedReader(_opts(**task), on_bad_record=on_bad, skipped=skipped, log=messages.append).read(path)
    return records, messages


def test_conll_docstart_blank_lines_and_tag_column(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n\nPeter NNP B-NP B-PER\n"
                    "Blackburn NNP I-NP I-PER\n")
    records, messages = _read(path)
    assert [r.values["tokens"] for r in records] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [r.values["label"]["tags"] for r in records] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert records[0].where == "train.txt line 3" and records[1].where == "train.txt line 8"
    assert records[1].values["text"] == "Peter Blackburn" and records[1].values["offsets"] == [[0, 5], [6, 15]]
    assert "train.txt: tags read as iob2" in messages[0]
    chunks, _ = _read(path, tag_column=2, scheme="iob2")  # the chunk column instead of NER
    assert chunks[0].values["label"]["tags"] == ["B-NP", "B-VP"]


def test_tab_separated_words_may_hold_spaces(tmp_path):
    path = tmp_path / "wnut.txt"
    path.write_text("New York\tB-location\nrocks\tO\n")
    (record,), _ = _read(path)
    assert record.values["tokens"] == ["New York", "rocks"]


def test_conll_wrong_column_count_names_file_line_and_fix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("EU NNP B-ORG\nrejects O\n\nPeter NNP B-PER\n")
    with pytest.raises(TuneforgeError, match=r"train.txt line 2: 2 column\(s\) where the file's lines have 3 \(as line "
                                             r"1\).*same columns.*data.on_bad_record: skip"):
        _read(path)
    skipped = []
    records, _ = _read(path, on_bad="skip", skipped=skipped)
    assert [r.values["tokens"] for r in records] == [["Peter"]] and "line 2" in skipped[0]


def test_iob1_converted_and_bioes_model_scheme(tmp_path):
    path = tmp_path / "iob1.txt"
    path.write_text("Peter I-PER\nBlackburn I-PER\nand O\nEU I-ORG\n")
    (record,), messages = _read(path, model_scheme="bioes")
    assert "read as iob1" in messages[0]
    assert record.values["label"]["tags"] == ["B-PER", "E-PER", "O", "S-ORG"]


def test_invalid_tag_error_names_the_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("Peter B-PER\nsaid O\nBlackburn I-PER\n")
    with pytest.raises(TuneforgeError, match=r"train.txt line 3: 'I-PER' follows 'O'"):
        _read(path, scheme="iob2", on_invalid_tag="error")
    (record,), messages = _read(path, scheme="iob2")
    assert record.values["label"]["tags"] == ["B-PER", "O", "B-PER"]
    assert "repaired 1 invalid tag(s)" in messages[-1]


def test_jsonl_words_and_integer_tags(tmp_path):
    path = write_token_jsonl(tmp_path / "train.jsonl", n=5)
    records, _ = _read(path)
    assert len(records) == 5 and records[0].values["label"]["row"] == json.loads(path.read_text().splitlines()[0])
    ints = tmp_path / "hf.jsonl"
    ints.write_text(json.dumps({"words": ["EU", "rejects"], "ner_tags": [3, 0]}) + "\n")
    (record,), _ = _read(ints, tokens_field="words", tags_field="ner_tags", tag_names=["O", "B-PER", "I-PER", "B-ORG"])
    assert record.values["label"]["tags"] == ["B-ORG", "O"]
    with pytest.raises(TuneforgeError, match=r"hf.jsonl line 1: integer tags .* set task.tag_names"):
        _read(ints, tokens_field="words", tags_field="ner_tags")


def test_character_spans_split_words_at_entity_boundaries(tmp_path):
    path = tmp_path / "spans.jsonl"
    text = "Ann works for AcmeCorp in New York."
    path.write_text(json.dumps({"text": text, "entities": [
        {"start": 0, "end": 3, "label": "PER"}, {"start": 14, "end": 18, "label": "ORG"},
        {"start": 26, "end": 34, "label": "LOC"}]}) + "\n")
    (record,), _ = _read(path)
    v = record.values
    assert v["tokens"] == ["Ann", "works", "for", "Acme", "Corp", "in", "New", "York", "."]  # AcmeCorp split at 18
    assert v["label"]["tags"] == ["B-PER", "O", "O", "B-ORG", "O", "O", "B-LOC", "I-LOC", "O"]
    assert all(v["text"][a:b] == w for (a, b), w in zip(v["offsets"], v["tokens"]))
    assert split_words("U.S. isn't") == [(0, 1), (1, 2), (2, 3), (3, 4), (5, 8), (8, 9), (9, 10)]
    same, _ = _read(write_span_jsonl(tmp_path / "s.jsonl", n=6))
    words, _ = _read(write_token_jsonl(tmp_path / "w.jsonl", n=6))
    assert [r.values["label"]["tags"] for r in same] == [r.values["label"]["tags"] for r in words]


@pytest.mark.parametrize("row,message", [
    ({"text": "Ann saw Rome", "entities": [{"start": 8, "end": 20, "label": "LOC"}]},
     r"bad.jsonl line 1: entities\[0\] \[8, 20\) lies outside its text of 12 characters.*fix the span"),
    ({"text": "Ann saw Rome", "entities": [{"start": 0, "end": 7, "label": "PER"}, {"start": 4, "end": 12, "label": "LOC"}]},
     r"overlap; nested or overlapping entities"),
    ({"text": "Ann saw Rome", "entities": [{"start": 0, "end": 3, "label": "O"}]}, r"a type name other than O"),
    ({"text": "  ", "entities": []}, r"bad.jsonl line 1: an empty sentence"),
    ({"tokens": [], "tags": []}, r"bad.jsonl line 1: an empty sentence \(no tokens\)"),
    ({"tokens": ["Ann", "saw"], "tags": ["B-PER"]}, r"2 tokens but 1 tags; give each word exactly one tag"),
    ({"tokens": ["Ann", ""], "tags": ["B-PER", "O"]}, r"tokens\[1\] is \"\", not a word"),
    ({"words": ["Ann"]}, r"no 'tokens' field \(fields: words\).*task.tokens_field"),
    ({"text": "Ann"}, r"'entities' is missing"),
])
def test_bad_jsonl_rows_name_line_and_fix(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TuneforgeError, match=message):
        _read(path)


def test_bad_recipe_options_are_named():
    with pytest.raises(TuneforgeError, match=r"task.scheme.*'iob1', 'iob2', 'bioes' or 'none'|task.scheme"):
        load_recipe({"task": {"type": "token-classification", "scheme": "iob3"}})
    with pytest.raises(TuneforgeError, match=r"data.text_column is not read by token-classification; set "
                                             r"task.text_field"):
        load_recipe({"task": {"type": "token-classification"}, "data": {"text_column": "sentence"}})
    with pytest.raises(TuneforgeError, match=r"data.format csv: token-classification reads CoNLL"):
        load_recipe({"task": {"type": "token-classification"}, "data": {"format": "csv"}})
    recipe = load_recipe({"task": {"type": "token-classification"}})
    assert recipe.train.metric_for_best == "f1"
    with pytest.raises(TuneforgeError, match=r"'accuracy' is not a token-classification validation metric.*f1"):
        load_recipe({"task": {"type": "token-classification"}, "train": {"metric_for_best": "accuracy"}})


def test_no_entities_in_training_data(tmp_path, tagger_bert_dir):
    from tuneforge import finetune

    from tagging_helpers import tagging_recipe

    path = tmp_path / "train.txt"
    path.write_text("".join(f"word{i} O\n\n" for i in range(6)))
    with pytest.raises(TuneforgeError, match=r"no tags other than O in \d+ sentences"):
        finetune(tagging_recipe(tagger_bert_dir, path, tmp_path / "run"))


from tagging_helpers import tagger_bert_dir  # noqa: E402,F401  (the fixture)


def test_conll_long_file_reads_fast_enough(tmp_path):
    records, _ = _read(write_conll(tmp_path / "t.txt", n=300, clauses=(1, 2)))
    assert len(records) == 300
