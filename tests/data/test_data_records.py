"""Tabular readers: formats, column mapping, line numbers, and every error naming file + line + fix."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from tuneforge.data.records import Record, file_fingerprint, read_records, resolve_format
from tuneforge.errors import TuneforgeError

COLS = {"text": "sentence", "label": "label"}


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding, newline="")
    return path


def test_csv_maps_roles_keeps_strings_and_line_numbers(tmp_path):
    # A quoted cell spanning two lines must not shift the later line numbers.
    f = write(tmp_path / "train.csv", 'sentence,label,id\nhello,01,a\n"multi\nline, quoted",1,b\n\nlast,0,\n')
    recs = read_records(f, columns=COLS, optional={"id": "id"})
    assert [r.values for r in recs] == [
        {"text": "hello", "label": "01", "id": "a"},
        {"text": "multi\nline, quoted", "label": "1", "id": "b"},
        {"text": "last", "label": "0"},  # empty optional value is left out
    ]
    assert [r.where for r in recs] == ["train.csv line 2", "train.csv line 3", "train.csv line 6"]
    assert isinstance(recs[0], Record)


def test_tsv_without_quoting_keeps_literal_quotes(tmp_path):
    # SST-2 style: '"' is an ordinary character, never a quote.
    f = write(tmp_path / "train.tsv", 'sentence\tlabel\n"the film" is "great\t1\nit \'s bad "\t0\n')
    recs = read_records(f, columns=COLS)
    assert [r.values["text"] for r in recs] == ['"the film" is "great', 'it \'s bad "']
    assert recs[1].where == "train.tsv line 3"


def test_jsonl_keeps_types_and_skips_blank_lines(tmp_path):
    lines = [{"t": "a", "y": 1}, {"t": "b", "y": ["x", "z"]}]
    f = write(tmp_path / "data.jsonl", json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    recs = read_records(f, columns={"text": "t", "label": "y"})
    assert [r.values["label"] for r in recs] == [1, ["x", "z"]]
    assert [r.where for r in recs] == ["data.jsonl line 1", "data.jsonl line 3"]


def test_json_array_file(tmp_path):
    f = write(tmp_path / "data.json", json.dumps([{"t": "a", "y": 0}, {"t": "b", "y": 1}]))
    recs = read_records(f, columns={"text": "t", "label": "y"})
    assert [r.where for r in recs] == ["data.json item 1", "data.json item 2"]


def test_parquet_rows_and_limit(tmp_path):
    f = tmp_path / "train.parquet"
    pd.DataFrame({"sentence": ["a", "b", "c"], "label": [0, 1, 0]}).to_parquet(f)
    recs = read_records(f, columns=COLS)
    assert [r.values for r in recs][1] == {"text": "b", "label": 1}
    assert recs[2].where == "train.parquet row 3"
    assert len(read_records(f, columns=COLS, limit=2)) == 2


def test_limit_and_gzip_and_txt_sniffing(tmp_path):
    body = "sentence,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(10))
    f = write(tmp_path / "train.csv", body)
    assert [r.values["text"] for r in read_records(f, columns=COLS, limit=3)] == ["s0", "s1", "s2"]
    gz = tmp_path / "train.csv.gz"
    gz.write_bytes(gzip.compress(body.encode()))
    assert len(read_records(gz, columns=COLS)) == 10
    txt = write(tmp_path / "train.txt", "sentence\tlabel\na,b\t1\n")
    assert resolve_format(txt) == "tsv"
    assert read_records(txt, columns=COLS)[0].values["text"] == "a,b"


def test_bom_is_stripped(tmp_path):
    f = tmp_path / "train.csv"
    f.write_bytes("sentence,label\nx,1\n".encode("utf-8-sig"))
    assert read_records(f, columns=COLS)[0].values == {"text": "x", "label": "1"}


def test_missing_column_lists_columns_suggests_and_names_hint(tmp_path):
    f = write(tmp_path / "train.csv", "sentence,label\nx,1\n")
    with pytest.raises(TuneforgeError) as e:
        read_records(f, columns={"text": "sentense", "label": "label"}, hints={"text": "data.text_column"})
    msg = str(e.value)
    assert "'sentense'" in msg and "train.csv" in msg and "columns are: sentence, label" in msg
    assert "did you mean 'sentence'" in msg and "data.text_column" in msg


def test_missing_column_in_jsonl_and_parquet(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"a": 1, "b": 2}\n')
    with pytest.raises(TuneforgeError, match=r"column 'text' .*d\.jsonl; columns are: a, b"):
        read_records(f, columns={"text": "text"})
    p = tmp_path / "d.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(p)
    with pytest.raises(TuneforgeError, match=r"columns are: a"):
        read_records(p, columns={"text": "text"})


@pytest.mark.parametrize("body, expect", [("", "the file is empty"), ("sentence,label\n", "only a header")])
def test_empty_and_header_only(tmp_path, body, expect):
    f = write(tmp_path / "train.csv", body)
    with pytest.raises(TuneforgeError, match=rf"train\.csv has no rows \({expect}"):
        read_records(f, columns=COLS)


def test_malformed_csv_line_named_and_skippable(tmp_path):
    f = write(tmp_path / "train.csv", "sentence,label\ngood,1\nhello, world,1\nok,0\n")
    with pytest.raises(TuneforgeError, match=r"train\.csv line 3: expected 2 fields .* found 3"):
        read_records(f, columns=COLS)
    skipped: list[str] = []
    recs = read_records(f, columns=COLS, on_bad_record="skip", skipped=skipped)
    assert [r.values["text"] for r in recs] == ["good", "ok"]
    assert len(skipped) == 1 and skipped[0].startswith("train.csv line 3:")


def test_broken_csv_quoting_names_line(tmp_path):
    f = write(tmp_path / "train.csv", 'sentence,label\nok,1\n"bad"x,1\n')
    with pytest.raises(TuneforgeError, match=r"train\.csv line 3: malformed CSV"):
        read_records(f, columns=COLS)


def test_bad_jsonl_lines(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"t": "a", "y": 1}\n{"t": "b", "y": \n')
    with pytest.raises(TuneforgeError, match=r"d\.jsonl line 2: invalid JSON"):
        read_records(f, columns={"text": "t", "label": "y"})
    f = write(tmp_path / "e.jsonl", '{"t": "a", "y": 1}\n\n[1, 2]\n')
    with pytest.raises(TuneforgeError, match=r"e\.jsonl line 3: expected a JSON object"):
        read_records(f, columns={"text": "t", "label": "y"})


def test_non_utf8_names_line_and_encoding_option(tmp_path):
    f = write(tmp_path / "train.csv", "sentence,label\nfine,1\ncaf\u00e9,0\n", encoding="latin-1")
    with pytest.raises(TuneforgeError) as e:
        read_records(f, columns=COLS)
    assert "train.csv line 3" in str(e.value) and "re-save the file as UTF-8" in str(e.value)
    assert "data.encoding" in str(e.value)
    assert read_records(f, columns=COLS, encoding="latin-1")[1].values["text"] == "caf\u00e9"
    with pytest.raises(TuneforgeError, match="unknown text encoding"):
        read_records(f, columns=COLS, encoding="latin-99")


def test_empty_label_error_and_skip(tmp_path):
    f = write(tmp_path / "train.csv", "sentence,label\na,1\nb,\n c , 0\n")
    with pytest.raises(TuneforgeError) as e:
        read_records(f, columns=COLS)
    msg = str(e.value)
    assert "train.csv line 3" in msg and "'label'" in msg and "on_bad_record: skip" in msg
    skipped: list[str] = []
    recs = read_records(f, columns=COLS, on_bad_record="skip", skipped=skipped)
    assert [r.where for r in recs] == ["train.csv line 2", "train.csv line 4"]
    assert skipped == ["train.csv line 3: empty value in column 'label'"]


def test_missing_jsonl_key_is_a_row_problem(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"t": "a", "y": 1}\n{"t": "b"}\n{"t": "c", "y": null}\n')
    skipped: list[str] = []
    recs = read_records(f, columns={"text": "t", "label": "y"}, on_bad_record="skip", skipped=skipped)
    assert len(recs) == 1 and [s.split(":")[0] for s in skipped] == ["d.jsonl line 2", "d.jsonl line 3"]


def test_all_rows_skipped_is_an_error(tmp_path):
    f = write(tmp_path / "train.csv", "sentence,label\na,\nb,\n")
    with pytest.raises(TuneforgeError, match="every row of train.csv was skipped"):
        read_records(f, columns=COLS, on_bad_record="skip")


def test_format_and_path_errors(tmp_path):
    f = write(tmp_path / "train.xlsx", "x")
    with pytest.raises(TuneforgeError, match=r"data\.format"):
        read_records(f, columns=COLS)
    with pytest.raises(TuneforgeError, match="did you mean 'csv'"):
        read_records(f, columns=COLS, format="cvs")
    assert len(read_records(write(tmp_path / "x.data", "sentence,label\na,1\n"), columns=COLS, format="csv")) == 1
    with pytest.raises(TuneforgeError, match="not found.*data.train"):
        read_records(tmp_path / "nope.csv", columns=COLS, hints={"path": "data.train"})
    with pytest.raises(TuneforgeError, match="did you mean 'skip'"):
        read_records(f, columns=COLS, on_bad_record="skp")


def test_file_fingerprint_file_and_dir(tmp_path):
    f = write(tmp_path / "a.csv", "x\n")
    fp = file_fingerprint(f)
    assert fp["bytes"] == 2 and len(fp["sha256"]) == 64
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "1.txt").write_text("one")
    (d / "2.txt").write_text("two")
    first = file_fingerprint(d)
    assert first["bytes"] == 6 and first == file_fingerprint(d)
    (d / "sub" / "1.txt").write_text("uno")
    assert file_fingerprint(d)["sha256"] != first["sha256"]


# ------------------------------------------------------------------ issue 22: silently wrong training data

def test_duplicate_column_names_are_refused_naming_them(tmp_path):
    # csv.DictReader-style rows keep the last of two same-named cells: every text became "x"
    f = write(tmp_path / "train.csv", "text,label,text\ngood film,pos,x\nbad film,neg,x\n")
    with pytest.raises(TuneforgeError) as e:
        read_records(f, columns={"text": "text", "label": "label"})
    msg = str(e.value)
    assert "train.csv line 1" in msg and "'text' (2 times)" in msg and "rename the duplicate columns" in msg
    f = write(tmp_path / "train.tsv", "\nsentence\tlabel\tlabel\na\t1\t0\n")  # the header is on line 2
    with pytest.raises(TuneforgeError, match=r"train\.tsv line 2: the column name 'label' \(2 times\)"):
        read_records(f, columns=COLS)
    # a duplicate the mapping does not read is harmless
    f = write(tmp_path / "notes.csv", "sentence,label,note,note\na,1,x,y\nb,0,x,y\n")
    assert [r.values for r in read_records(f, columns=COLS)] == [{"text": "a", "label": "1"},
                                                                 {"text": "b", "label": "0"}]


def test_duplicate_column_names_in_parquet_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a", "b"]), pa.array([0, 1]), pa.array(["x", "x"])],
                                        names=["text", "label", "text"]), f)
    with pytest.raises(TuneforgeError, match=r"train\.parquet \(its schema\): the column name 'text' \(2 times\)"):
        read_records(f, columns={"text": "text", "label": "label"})


def test_json_object_with_a_key_twice_is_a_bad_record(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0, "text": "x"}\n')
    with pytest.raises(TuneforgeError, match=r"d\.jsonl line 2: the key 'text' occurs twice"):
        read_records(f, columns={"text": "text", "label": "label"})
    skipped: list[str] = []
    assert len(read_records(f, columns={"text": "text", "label": "label"}, on_bad_record="skip",
                            skipped=skipped)) == 1 and skipped[0].startswith("d.jsonl line 2:")


KINDS = {"text": "text", "label": "label"}


@pytest.mark.parametrize("bad, expect", [
    ({"text": ["good", "film"], "label": 1}, "column 'text' holds a list"),
    ({"text": {"words": "good"}, "label": 1}, "column 'text' holds an object"),
    ({"text": 5, "label": 1}, "column 'text' holds a number 5, not a string"),
    ({"text": "good", "label": [1, 0]}, "where a single label is expected — for several labels per row set "
                                        "task.multi_label: true"),
    ({"text": "good", "label": {"y": 1}}, "column 'label' holds an object"),
])
def test_jsonl_values_of_the_wrong_type_are_bad_records(tmp_path, bad, expect):
    rows = [{"text": "bad film", "label": 0}, bad, {"text": "fun film", "label": 1}]
    f = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TuneforgeError) as e:
        read_records(f, columns=KINDS, kinds=KINDS)
    msg = str(e.value)
    assert msg.startswith("d.jsonl line 2: ") and expect in msg and "data.on_bad_record: skip" in msg, msg
    skipped: list[str] = []
    recs = read_records(f, columns=KINDS, kinds=KINDS, on_bad_record="skip", skipped=skipped)
    assert [r.where for r in recs] == ["d.jsonl line 1", "d.jsonl line 3"] and len(skipped) == 1


def test_multi_label_lists_are_typed_too(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["x", ["y"]]}\n')
    kinds = {"text": "text", "label": "labels"}
    with pytest.raises(TuneforgeError, match=r"d\.jsonl line 2: column 'label' holds a list with a list"):
        read_records(f, columns=KINDS, kinds=kinds)
    assert read_records(f, columns=KINDS, kinds=kinds, limit=1)[0].values["label"] == ["x", "y"]


def test_binary_text_in_parquet_is_a_bad_record(tmp_path):
    f = tmp_path / "train.parquet"
    pd.DataFrame({"text": [b"good film", b"bad film"], "label": [1, 0]}).to_parquet(f)
    with pytest.raises(TuneforgeError, match=r"train\.parquet row 1: column 'text' holds binary data \(9 bytes\)"):
        read_records(f, columns=KINDS, kinds=KINDS)


def test_missing_value_markers_and_nan_labels_are_bad_records(tmp_path):
    f = write(tmp_path / "train.csv", "text,label\na,1.0\nb, nan\nc,NULL\nd,0\n")
    skipped: list[str] = []
    recs = read_records(f, columns=KINDS, kinds=KINDS, on_bad_record="skip", skipped=skipped)
    assert [r.values["text"] for r in recs] == ["a", "d"]
    assert [s.split(":")[0] for s in skipped] == ["train.csv line 3", "train.csv line 4"]
    assert "'nan', a missing-value marker" in skipped[0]
    # JSON NaN (Python's json reads it) and Parquet nulls / NaN (pandas' missing numbers) are empty values
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(TuneforgeError, match=r"d\.jsonl line 2: empty value in column 'label'"):
        read_records(f, columns=KINDS, kinds=KINDS)
    p = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1.0, float("nan"), 0.0]}).to_parquet(p)
    with pytest.raises(TuneforgeError, match=r"t\.parquet row 2: empty value in column 'label'"):
        read_records(p, columns=KINDS, kinds=KINDS)


def test_first_jsonl_line_lacking_a_key_is_named(tmp_path):
    # it used to be "column 'text' not found in d.jsonl" for the whole file
    f = write(tmp_path / "d.jsonl", '{"sentence": "a", "label": 1}\n{"text": "b", "label": 0}\n'
                                    '{"text": "c", "label": 1}\n')
    with pytest.raises(TuneforgeError) as e:
        read_records(f, columns=KINDS, hints={"text": "data.text_column"})
    msg = str(e.value)
    assert msg.startswith("d.jsonl line 1: no 'text' key in this object (its keys: sentence, label)"), msg
    assert "fix or delete that line" in msg
    skipped: list[str] = []
    recs = read_records(f, columns=KINDS, on_bad_record="skip", skipped=skipped)
    assert [r.values["text"] for r in recs] == ["b", "c"] and skipped[0].startswith("d.jsonl line 1: no 'text' key")
    # a key that no line has is the mapping's mistake, reported once for the file, skip or not
    f = write(tmp_path / "e.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0, "id": 3}\n')
    for mode in ("error", "skip"):
        with pytest.raises(TuneforgeError, match=r"column 'text' not found in any JSON object of e\.jsonl; columns "
                                                 r"are: sentence, label, id .*set data\.text_column"):
            read_records(f, columns=KINDS, hints={"text": "data.text_column"}, on_bad_record=mode)
