"""Property tests: whatever bytes, records or recipe mappings a user hands us, the only
exception that may escape is ``TuneforgeError`` (a clean message naming the fix);
anything else is a bug in tuneforge. A successful result is always fine.

Each property keeps to a few seconds (small examples, ``deadline=None`` because the
first call pays for imports).
"""

from __future__ import annotations

import csv
import io
import json
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tuneforge.data.images import load_image, read_image_records
from tuneforge.data.records import read_records
from tuneforge.errors import TuneforgeError
from tuneforge.recipe import Recipe, load_recipe

# database=None: no .hypothesis/ folder in the checkout; a failure prints its own reproducer.
# Damaged TIFFs make PIL warn about their metadata before it fails; that noise is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = settings(max_examples=200, deadline=None, report_multiple_bugs=False, database=None,
                suppress_health_check=[HealthCheck.too_slow])
COLS = {"text": "text", "label": "label"}
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt", ".csv.gz")


def _tmpdir() -> Path:
    # hypothesis re-runs the body many times; a function-scoped tmp_path would be shared
    # across examples, so each example gets its own directory.
    return Path(tempfile.mkdtemp(prefix="tf-prop-"))


def _only_tuneforge_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TuneforgeError as err:
        assert str(err).strip(), "a TuneforgeError must carry a message"
        return None


# ----------------------------------------------------------------- tabular readers

def _seeded(prefix: bytes) -> st.SearchStrategy[bytes]:
    """Bytes that start like a real file of the format, so the parser gets past its first check."""
    return st.binary(max_size=200).map(lambda tail: prefix + tail)


RAW = st.one_of(
    st.binary(max_size=300),
    _seeded(b"text,label\n"),
    _seeded(b"text\tlabel\n"),
    _seeded(b'{"text": "a", "label": 1}\n'),
    _seeded(b"["),
    _seeded(b"PAR1"),
    _seeded(b"\x1f\x8b\x08\x00"),
    st.text(alphabet=st.sampled_from(list('ab,"\t\n\r{}[]:\\ \x00é')), max_size=80).map(lambda s: s.encode()),
)


@FAST
@given(data=RAW, suffix=st.sampled_from(SUFFIXES), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
       skip=st.booleans())
def test_random_bytes_as_tabular_file(data, suffix, encoding, skip):
    path = _tmpdir() / f"train{suffix}"
    path.write_bytes(data)
    _only_tuneforge_errors(read_records, path, columns=COLS, encoding=encoding,
                           on_bad_record="skip" if skip else "error", skipped=[])


def _parquet_bytes() -> bytes:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame({"text": ["good film", "bad plot", "fun"], "label": [0, 1, 0]}).to_parquet(buf)
    return buf.getvalue()


PARQUET = _parquet_bytes()


@FAST
@given(cut=st.integers(0, len(PARQUET)), flips=st.lists(st.tuples(st.integers(0, len(PARQUET) - 1),
                                                                   st.integers(0, 255)), max_size=4))
def test_damaged_parquet(cut, flips):
    data = bytearray(PARQUET)
    for pos, byte in flips:
        data[pos] = byte
    path = _tmpdir() / "train.parquet"
    path.write_bytes(bytes(data[:cut] if cut < len(data) else data))
    _only_tuneforge_errors(read_records, path, columns=COLS)


@FAST
@given(depth=st.integers(500, 5000), array=st.booleans())
def test_deeply_nested_json(depth, array):
    path = _tmpdir() / ("train.json" if array else "train.jsonl")
    path.write_text("[" * depth + "]" * depth if array else '{"text": ' + "[" * depth + "]" * depth + "}\n")
    _only_tuneforge_errors(read_records, path, columns=COLS)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)
ROW_KEYS = st.sampled_from(["text", "label", "id", "Text", "", "x"])


@FAST
@given(rows=st.lists(st.dictionaries(ROW_KEYS, JSON_VALUES, max_size=4), max_size=6))
def test_random_json_records_roundtrip(rows):
    path = _tmpdir() / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = _only_tuneforge_errors(read_records, path, columns=COLS, optional={"id": "id"})
    if records is not None:  # every row had both values: they come back unchanged, in order
        assert [r.values["text"] for r in records] == [row["text"] for row in rows]
        assert [r.values["label"] for r in records] == [row["label"] for row in rows]


CELLS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@FAST
@given(rows=st.lists(st.tuples(CELLS, CELLS), max_size=6), sep=st.sampled_from([",", "\t"]))
def test_random_csv_records_roundtrip(rows, sep):
    if sep == "\t":  # unquoted TSV cannot hold tabs or line breaks inside a cell
        rows = [tuple(c.replace("\t", " ").replace("\r", " ").replace("\n", " ") for c in r) for r in rows]
    path = _tmpdir() / ("train.csv" if sep == "," else "train.tsv")
    buf = io.StringIO(newline="")
    # The default "\r\n" terminator makes the writer quote a cell holding a lone "\r".
    writer = csv.writer(buf, delimiter=sep, quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
                        escapechar=None if sep == "," else "\\")
    writer.writerow(["text", "label"])
    try:
        writer.writerows(rows)
    except csv.Error:
        assume(False)  # not writable unquoted: not a file a user could have
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    records = _only_tuneforge_errors(read_records, path, columns=COLS, on_bad_record="skip", skipped=[])
    if records is not None and sep == ",":
        kept = [r for r in rows if r[0].strip() and r[1].strip() and any(r)]
        assert [(r.values["text"], r.values["label"]) for r in records] == kept


# ----------------------------------------------------------------- images

def _image_bytes(mode: str, fmt: str) -> bytes:
    from PIL import Image

    size = (6, 5)
    im = Image.new(mode, size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_image_bytes(m, f) for m, f in (("RGB", "PNG"), ("RGB", "JPEG"), ("P", "GIF"), ("RGB", "BMP"),
                                         ("I;16", "PNG"), ("RGBA", "WEBP"), ("CMYK", "TIFF"), ("LA", "PNG"))]


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


@FAST
@given(data=st.one_of(st.binary(max_size=200), damaged_images()), as_file=st.booleans(),
       suffix=st.sampled_from([".png", ".jpg", ".gif", ".tif", ".bmp", ".webp"]),
       max_pixels=st.sampled_from([None, 10, 10**8]))
def test_random_bytes_as_image(data, as_file, suffix, max_pixels):
    source: object = data
    if as_file:
        source = _tmpdir() / f"img{suffix}"
        source.write_bytes(data)
    image = _only_tuneforge_errors(load_image, source, max_pixels=max_pixels, where="train.csv line 2")
    if image is not None:
        assert image.mode == "RGB"


PATHS = st.one_of(st.text(max_size=30), st.sampled_from(["../x.png", "~nobody_tf/x.png", "a\x00b.png", "/",
                                                          "~", "img.png", "sub/../img.png", "x" * 300]))


@FAST
@given(paths=st.lists(PATHS, min_size=1, max_size=4), fmt=st.sampled_from(["csv", "jsonl"]), skip=st.booleans())
def test_random_image_manifest(paths, fmt, skip):
    root = _tmpdir()
    (root / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(root / "data" / "img.png")
    manifest = root / "data" / f"m.{fmt}"
    if fmt == "csv":
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "label"])
        w.writerows([(p, "a") for p in paths])
        manifest.write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass", newline="")
    else:
        manifest.write_text("".join(json.dumps({"image": p, "label": "a"}) + "\n" for p in paths))
    records = _only_tuneforge_errors(read_image_records, manifest, on_bad_record="skip" if skip else "error",
                                     skipped=[])
    for r in records or []:  # a relative path never leads outside the manifest's folder
        assert Path(r.values["image"]).is_absolute()


@FAST
@given(data=st.one_of(st.binary(max_size=200), _seeded(b"image,label\n")),
       suffix=st.sampled_from([".csv", ".jsonl", ".parquet"]))
def test_random_bytes_as_image_manifest(data, suffix):
    path = _tmpdir() / f"m{suffix}"
    path.write_bytes(data)
    _only_tuneforge_errors(read_image_records, path, on_bad_record="error")


# ----------------------------------------------------------------- recipes

def _recipe_keys() -> list[str]:
    keys = set()
    for section, field in Recipe.model_fields.items():
        keys.add(section)
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys.update(annotation.model_fields)
    return sorted(keys | {"name", "rank", "alpha", "layers", "targets", "validation", "early_stopping"})


RECIPE_KEYS = _recipe_keys()
KEYS = st.one_of(st.sampled_from(RECIPE_KEYS), st.text(alphabet=string.ascii_lowercase + "_.", max_size=8))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=10), st.sampled_from(["lora", "full", "auto", "cpu", "text-classification",
                                                           "image-classification", "skip", "error", "1e-3"]))
NESTED = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@st.composite
def recipe_like(draw) -> dict:
    """A mapping whose top level mostly uses real section names, so validation goes deep."""
    sections = draw(st.dictionaries(st.sampled_from(list(Recipe.model_fields)),
                                    st.one_of(st.dictionaries(KEYS, NESTED, max_size=4), NESTED), max_size=4))
    if draw(st.booleans()):
        sections.update(draw(st.dictionaries(KEYS, NESTED, max_size=2)))
    return sections


@FAST
@given(data=recipe_like())
def test_random_mapping_as_recipe(data):
    _only_tuneforge_errors(load_recipe, data)


@FAST
@given(data=recipe_like())
def test_random_mapping_as_yaml_recipe_file(data):
    path = _tmpdir() / "recipe.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        assume(False)
    _only_tuneforge_errors(load_recipe, path)


@FAST
@given(text=st.one_of(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"\n #,?")), max_size=60),
                      st.binary(max_size=60).map(lambda b: b.decode("latin-1"))),
       raw=st.booleans())
def test_random_yaml_text_as_recipe(text, raw):
    path = _tmpdir() / "recipe.yaml"
    path.write_bytes(text.encode("latin-1") if raw else text.encode("utf-8"))
    _only_tuneforge_errors(load_recipe, path)


@FAST
@given(overrides=st.lists(st.text(alphabet=st.sampled_from(list("train.lr=[]{}:,-1e5 ")), max_size=20), max_size=3))
def test_random_overrides(overrides):
    _only_tuneforge_errors(load_recipe, {}, overrides)


@pytest.mark.parametrize("data", [
    {"strategy": 5}, {"strategy": [1]}, {"strategy": {"name": [1]}},
], ids=["strategy-int", "strategy-list", "strategy-name-list"])
def test_strategy_that_is_not_a_mapping_is_a_recipe_error(data):
    with pytest.raises(TuneforgeError, match="strategy"):
        load_recipe(data)


@pytest.mark.parametrize("overrides, named", [(["=1"], "--set"), ([".=1"], "--set"), (["train.lr=["], "train.lr")],
                         ids=["empty-key", "dot-key", "bad-yaml"])
def test_malformed_overrides_are_recipe_errors(overrides, named):
    with pytest.raises(TuneforgeError, match=named):
        load_recipe({}, overrides)


@pytest.mark.parametrize("text", [b"\xff\xfe train: {}", b"[" * 5000], ids=["not-utf8", "deep-nesting"])
def test_undecodable_or_too_deep_yaml_is_a_recipe_error(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text)
    with pytest.raises(TuneforgeError, match="recipe.yaml"):
        load_recipe(path)
