"""Readers of per-token tagging data -> one :class:`Record` per sentence.

Three layouts, told apart by the file (``.jsonl``/``.json``/``.ndjson`` are JSON lines,
anything else is read as CoNLL columns) and, in JSON lines, by each row's fields:

* **CoNLL columns**: one word a line, columns separated by whitespace (by tabs when the
  line holds one, so a word may contain spaces), the tag in ``task.tag_column`` (default
  the last), a blank line between sentences, ``-DOCSTART-`` lines skipped;
* **JSON lines of words**: ``{"tokens": [...], "tags": [...]}`` (``task.tokens_field``,
  ``task.tags_field``; integer tags name ``task.tag_names``);
* **JSON lines of character spans**: ``{"text": "...", "entities": [{"start", "end",
  "label"}]}`` (``task.text_field``, ``task.entities_field``): the text is split into words
  by :func:`split_words`, and a word is also split where an entity starts or ends inside it.

A record's values: ``text`` (the sentence; for word data the words joined by single spaces),
``tokens`` (the words), ``offsets`` (each word's ``[start, end)`` in ``text``), and
``label``: ``{"tags": the model-scheme tags, "row": the row as read}`` (the row lets
cross-validation write folds the recipe reads again identically; under ``label`` it is left
out of the train/validation overlap check, which compares inputs only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import TuneforgeError
from .records import Record
from .tag_schemes import detect_scheme, read_spans, write_tags

# Raw strings become words this way (BERT's basic tokenizer's rule without lower-casing):
# a run of letters, digits and underscores, or any other single non-space character.
WORD = re.compile(r"\w+|[^\w\s]")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def split_words(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` character offsets of the words of a raw string (see :data:`WORD`)."""
    return [m.span() for m in WORD.finditer(text)]


def joined(tokens: list[str]) -> tuple[str, list[list[int]]]:
    """Words joined by single spaces, and each word's offsets in that text."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append([at, at + len(t)])
        at += len(t) + 1
    return " ".join(tokens), offsets


def is_json_lines(path: str | Path, data_format: str) -> bool:
    if data_format == "jsonl":
        return True
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    return bool(suffixes) and suffixes[-1] in JSON_SUFFIXES


class TaggedReader:
    """Reads one file with the task's options (``opts``: the ``task:`` block) into records whose
    tags are in the model's scheme. ``log`` hears which scheme was detected and what was repaired."""

    def __init__(self, opts, *, encoding: str = "utf-8", on_bad_record: str = "error", skipped: list | None = None,
                 data_format: str = "auto", log=None):
        self.opts, self.encoding, self.on_bad = opts, encoding, on_bad_record
        self.skipped = skipped if skipped is not None else []
        self.data_format, self.log = data_format, log or (lambda message: None)

    # -- the file
    def read(self, path: str | Path, limit: int | None = None) -> list[Record]:
        path = Path(path)
        if path.is_dir():
            raise TuneforgeError(f"{path} is a directory; token-classification reads one CoNLL or JSON-lines file per split")
        rows = list(self._json_rows(path, limit) if is_json_lines(path, self.data_format) else self._conll_rows(path, limit))
        if not rows:
            raise TuneforgeError(f"{path} holds no sentences; a CoNLL file has one word a line with a blank line between "
                                 "sentences, a JSON-lines file one object a line")
        scheme = self.opts.scheme
        worded = [r for r in rows if "tags" in r]
        if scheme == "auto":
            scheme, why = detect_scheme([r["tags"] for r in worded]) if worded else ("iob2", "")
            if worded:
                self.log(f"{path.name}: tags read as {scheme} ({why}; task.scheme sets it)")
        records, repaired = [], []
        for row in rows:
            try:
                record, fixed = self._record(row, scheme)
            except TuneforgeError as err:
                if self.on_bad != "skip":
                    raise
                self.skipped.append(str(err))
                continue
            records.append(record)
            repaired += fixed
        if repaired:
            self.log(f"[yellow]{path.name}: repaired {len(repaired)} invalid tag(s)[/] (task.on_invalid_tag: repair), "
                     "e.g. " + "; ".join(repaired[:3]))
        return records

    def _record(self, row: dict, scheme: str) -> tuple[Record, list[str]]:
        where = row["where"]
        if "text" in row:
            text, offsets, spans = self._spans_row(row)
            fixed: list[str] = []
        else:
            tokens = row["tokens"]
            text, offsets = joined(tokens)
            lines = row.get("lines")
            spans, fixed = read_spans(row["tags"], scheme, repair=self.opts.on_invalid_tag == "repair",
                                      where=(lambda i: f"{row['file']} line {lines[i]}") if lines else
                                      (lambda i: f"{where}, word {i + 1} ('{tokens[i]}')"))
        tokens = [text[a:b] for a, b in offsets]
        tags = write_tags(spans, len(tokens), self.opts.model_scheme if scheme != "none" else "none")
        return Record({"text": text, "tokens": tokens, "offsets": offsets,
                       "label": {"tags": tags, "row": row["source"]}}, where), fixed

    # -- CoNLL columns
    def _conll_rows(self, path: Path, limit: int | None) -> Iterator[dict]:
        opts = self.opts
        columns, first = None, None
        tokens, tags, lines = [], [], []
        count, dropping = 0, False  # dropping: the rest of a sentence with a bad line (data.on_bad_record: skip)
        try:
            with open(path, encoding=self.encoding if self.encoding != "utf-8" else "utf-8-sig") as f:
                for number, line in enumerate(f, start=1):
                    stripped = line.strip()
                    if stripped.startswith("-DOCSTART-") or not stripped:
                        dropping = False
                        if tokens:
                            yield self._sentence(path, tokens, tags, lines)
                            count += 1
                            if limit and count >= limit:
                                return
                        tokens, tags, lines = [], [], []
                        continue
                    if dropping:
                        continue
                    cells = line.rstrip("\r\n").split("\t") if "\t" in line else stripped.split()
                    if columns is None:
                        columns, first = len(cells), number
                        need = max(opts.word_column, opts.tag_column if opts.tag_column >= 0 else -opts.tag_column - 1) + 1
                        if columns < max(2, need):
                            raise TuneforgeError(
                                f"{path.name} line {number}: {columns} column(s) ({stripped[:60]!r}); a CoNLL file needs "
                                f"the word (task.word_column {opts.word_column}) and the tag (task.tag_column "
                                f"{opts.tag_column}) on each line — check the file, or set those options")
                    if len(cells) != columns:
                        problem = (f"{path.name} line {number}: {len(cells)} column(s) where the file's lines have "
                                   f"{columns} (as line {first}): {stripped[:80]!r} — give every word line the same "
                                   "columns (word ... tag); a blank line separates sentences")
                        if self.on_bad != "skip":
                            raise TuneforgeError(problem + ", or set data.on_bad_record: skip to drop the sentence")
                        self.skipped.append(problem)
                        tokens, tags, lines, dropping = [], [], [], True
                        continue
                    word, tag = cells[opts.word_column].strip(), cells[opts.tag_column].strip()
                    if not word or not tag:
                        raise TuneforgeError(f"{path.name} line {number}: an empty {'word' if not word else 'tag'} "
                                             f"({stripped[:80]!r}); fill it in or delete the line")
                    tokens.append(word)
                    tags.append(tag)
                    lines.append(number)
                if tokens:
                    yield self._sentence(path, tokens, tags, lines)
        except UnicodeDecodeError as err:
            raise TuneforgeError(f"{path.name} is not {self.encoding} text ({err.reason} at byte {err.start}); set "
                                 "data.encoding to the file's encoding") from None

    def _sentence(self, path: Path, tokens: list[str], tags: list[str], lines: list[int]) -> dict:
        opts = self.opts
        return {"where": f"{path.name} line {lines[0]}", "file": path.name, "tokens": tokens, "tags": tags,
                "lines": lines, "source": {opts.tokens_field: tokens, opts.tags_field: tags}}

    # -- JSON lines
    def _json_rows(self, path: Path, limit: int | None) -> Iterator[dict]:
        opts = self.opts
        count = 0
        try:
            with open(path, encoding=self.encoding) as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path.name} line {number}"
                    try:
                        row = json.loads(line)
                        parsed = self._json_row(row, where)
                    except (ValueError, TuneforgeError) as err:
                        problem = str(err) if isinstance(err, TuneforgeError) else f"{where}: not valid JSON ({err})"
                        if self.on_bad != "skip":
                            raise TuneforgeError(problem) from None
                        self.skipped.append(problem)
                        continue
                    yield parsed
                    count += 1
                    if limit and count >= limit:
                        return
        except UnicodeDecodeError as err:
            raise TuneforgeError(f"{path.name} is not {self.encoding} text ({err.reason} at byte {err.start}); set "
                                 "data.encoding to the file's encoding") from None

    def _json_row(self, row, where: str) -> dict:
        opts = self.opts
        if not isinstance(row, dict):
            raise TuneforgeError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        if opts.text_field in row or opts.entities_field in row:
            for key in (opts.text_field, opts.entities_field):
                if key not in row:
                    raise TuneforgeError(f"{where}: a character-span row needs '{opts.text_field}' and "
                                         f"'{opts.entities_field}'; '{key}' is missing (task.text_field / "
                                         "task.entities_field name them)")
            return {"where": where, "text": row[opts.text_field], "entities": row[opts.entities_field],
                    "source": {opts.text_field: row[opts.text_field], opts.entities_field: row[opts.entities_field]}}
        missing = [k for k in (opts.tokens_field, opts.tags_field) if k not in row]
        if missing:
            raise TuneforgeError(f"{where}: no '{missing[0]}' field (fields: {', '.join(map(str, row)) or 'none'}); rows "
                                 f"are {{'{opts.tokens_field}': [...], '{opts.tags_field}': [...]}} or "
                                 f"{{'{opts.text_field}': ..., '{opts.entities_field}': [...]}} — set task.tokens_field/"
                                 "tags_field (or text_field/entities_field) to the file's names")
        tokens, tags = row[opts.tokens_field], row[opts.tags_field]
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise TuneforgeError(f"{where}: '{opts.tokens_field}' and '{opts.tags_field}' must be lists")
        if not tokens:
            raise TuneforgeError(f"{where}: an empty sentence (no {opts.tokens_field}); give it words or delete the line")
        if len(tokens) != len(tags):
            raise TuneforgeError(f"{where}: {len(tokens)} {opts.tokens_field} but {len(tags)} {opts.tags_field}; "
                                 "give each word exactly one tag")
        for i, t in enumerate(tokens):
            if not isinstance(t, str) or not t.strip():
                raise TuneforgeError(f"{where}: {opts.tokens_field}[{i}] is {json.dumps(t)}, not a word; every token "
                                     "must be non-empty text")
            if any(c.isspace() for c in t):
                raise TuneforgeError(f"{where}: {opts.tokens_field}[{i}] {json.dumps(t)} holds whitespace; give each "
                                     "word as its own token")
        tags = [self._tag_name(t, where, i) for i, t in enumerate(tags)]
        return {"where": where, "tokens": [str(t) for t in tokens], "tags": tags,
                "source": {opts.tokens_field: tokens, opts.tags_field: row[opts.tags_field]}}

    def _tag_name(self, tag, where: str, i: int) -> str:
        names = self.opts.tag_names
        if isinstance(tag, bool) or not isinstance(tag, (str, int)):
            raise TuneforgeError(f"{where}: {self.opts.tags_field}[{i}] is {json.dumps(tag)}; a tag is a string or an "
                                 "integer index into task.tag_names")
        if isinstance(tag, int):
            if not names:
                raise TuneforgeError(f"{where}: integer tags ({self.opts.tags_field}[{i}] = {tag}) need their names: "
                                     "set task.tag_names to the list the integers index, e.g. [O, B-PER, I-PER]")
            if not 0 <= tag < len(names):
                raise TuneforgeError(f"{where}: tag {tag} is outside task.tag_names (0..{len(names) - 1})")
            return names[tag]
        if not tag.strip():
            raise TuneforgeError(f"{where}: {self.opts.tags_field}[{i}] is an empty tag; write O for no entity")
        return tag.strip()

    def _spans_row(self, row: dict) -> tuple[str, list[list[int]], list]:
        """Words of a character-span row (split where an entity begins or ends inside one), and the
        entities as word spans."""
        opts, where, text, entities = self.opts, row["where"], row["text"], row["entities"]
        if not isinstance(text, str):
            raise TuneforgeError(f"{where}: '{opts.text_field}' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise TuneforgeError(f"{where}: an empty sentence ('{opts.text_field}' holds no words); delete the line")
        if not isinstance(entities, list):
            raise TuneforgeError(f"{where}: '{opts.entities_field}' must be a list of {{start, end, label}}")
        spans = []
        for k, e in enumerate(entities):
            name = f"{opts.entities_field}[{k}]"
            if not isinstance(e, dict) or not {"start", "end", "label"} <= set(e):
                raise TuneforgeError(f"{where}: {name} must be an object with start, end and label, got {json.dumps(e)}")
            start, end, label = e["start"], e["end"], e["label"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
                raise TuneforgeError(f"{where}: {name} start/end must be integer character offsets, got {start!r}, {end!r}")
            if not 0 <= start < end <= len(text):
                raise TuneforgeError(f"{where}: {name} [{start}, {end}) lies outside its text of {len(text)} characters "
                                     "(or is empty); offsets count characters from 0, end exclusive — fix the span")
            if not isinstance(label, str) or not label.strip() or label.strip() == "O":
                raise TuneforgeError(f"{where}: {name} has label {json.dumps(label)}; an entity needs a type name other "
                                     "than O")
            if not text[start:end].strip():
                raise TuneforgeError(f"{where}: {name} [{start}, {end}) covers only whitespace; fix the span")
            spans.append((start, end, label.strip()))
        spans.sort()
        for (a0, a1, la), (b0, b1, lb) in zip(spans, spans[1:]):
            if b0 < a1:
                raise TuneforgeError(f"{where}: entities [{a0}, {a1}) {la} and [{b0}, {b1}) {lb} overlap; nested or "
                                     "overlapping entities cannot be tagged one tag per word — keep one of them")
        cuts = sorted({p for s, e, _ in spans for p in (s, e)})
        offsets = []
        for a, b in split_words(text):
            inner = [c for c in cuts if a < c < b]
            for s, e in zip([a, *inner], [*inner, b]):
                offsets.append([s, e])
        word_spans = []
        for s, e, label in spans:
            covered = [i for i, (a, b) in enumerate(offsets) if a < e and s < b]
            word_spans.append((covered[0], covered[-1] + 1, label))
        return text, offsets, word_spans
