"""Uploaded files: streamed to disk under a size limit, validated line by line, stored by content hash.

Shapes a ``purpose=fine-tune`` upload may have (decided by the first record, then every line
must have the same shape):

- ``chat`` (OpenAI's supervised format): ``{"messages": [{"role": "system|developer|user|assistant",
  "content": "..."}, ...]}`` with at least one assistant message;
- ``preference`` (OpenAI's DPO format): ``{"input": {"messages": [...]}, "preferred_output":
  [{"role": "assistant", "content": "..."}], "non_preferred_output": [...]}``;
- ``records``: any other JSON object per line, for tasks submitted through the ``tuneforge``
  extension (``{"text": ..., "label": ...}`` for a classifier); the task checks them when the job
  is validated;
- ``table``: a ``.csv`` / ``.tsv`` file with a header row, every row as wide as the header.

A bad line is an error naming the line and what is wrong, and nothing is stored. A stored file
lives at ``<data-dir>/files/<sha256[:2]>/<sha256>``: the path comes from the content, never
from the uploaded name, so no file name can reach outside the data directory; two uploads of
the same bytes share one copy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

from ..errors import TuneforgeError

ROLES = ("system", "developer", "user", "assistant")


class BadUpload(TuneforgeError):
    """An upload that is refused: too large, or a line that is not a valid training example."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def store_path(data_dir: Path, sha256: str) -> Path:
    return Path(data_dir) / "files" / sha256[:2] / sha256


async def receive(upload, data_dir: Path, max_bytes: int) -> tuple[Path, str, int]:
    """Stream an upload into a temporary file in the data dir: (temp path, sha256, bytes)."""
    tmp_dir = Path(data_dir) / "files" / ".incoming"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise BadUpload(f"the file is larger than this server's upload limit of {max_bytes >> 20} MiB "
                                    "(tuneforge service start --max-upload-mb)")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), digest.hexdigest(), size


def keep(tmp: Path, data_dir: Path, sha256: str) -> Path:
    """Move a validated upload to its content address (atomic rename; a copy already there is kept)."""
    final = store_path(data_dir, sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        tmp.unlink()
    else:
        os.replace(tmp, final)
    return final


# --------------------------------------------------------------------------- validation

def validate(path: Path, filename: str, max_rows: int) -> tuple[str, int]:
    """(kind, rows) of a training file, or BadUpload naming the first bad line."""
    suffix = Path(filename).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "table", _validate_table(path, "\t" if suffix == ".tsv" else ",", max_rows)
    kind, rows = None, 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadUpload(f"line {number}: not UTF-8 text (byte {err.start + 1}); save the file as UTF-8",
                                number) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as err:
                raise BadUpload(f"line {number}: not valid JSON ({err.msg} at column {err.colno}); the file must be "
                                "JSONL: one JSON object per line", number) from None
            if not isinstance(obj, dict):
                raise BadUpload(f"line {number}: expected a JSON object, got {type(obj).__name__}", number)
            shape = shape_of(obj)
            if kind is None:
                kind = shape
            elif shape != kind:
                raise BadUpload(f"line {number}: a {shape} example, but the file's first example is a {kind} "
                                "example; one file holds one shape", number)
            problem = check(obj, shape)
            if problem:
                raise BadUpload(f"line {number}: {problem}", number)
            rows += 1
            if rows > max_rows:
                raise BadUpload(f"line {number}: more than {max_rows} examples (this server's limit)", number)
    if not rows:
        raise BadUpload("the file holds no examples (it is empty or only blank lines)", 1)
    return kind, rows


def shape_of(obj: dict) -> str:
    if "messages" in obj:
        return "chat"
    if "preferred_output" in obj or "non_preferred_output" in obj or ("input" in obj and isinstance(obj["input"], dict)):
        return "preference"
    return "records"


def check(obj: dict, shape: str) -> str | None:
    """What is wrong with one example of ``shape``, or None."""
    if shape == "chat":
        problem = _messages(obj["messages"], "messages")
        if problem:
            return problem
        if not any(m.get("role") == "assistant" for m in obj["messages"]):
            return "'messages' has no assistant message, so there is nothing to learn; add the reply as " \
                   '{"role": "assistant", "content": "..."}'
        return None
    if shape == "preference":
        for key in ("input", "preferred_output", "non_preferred_output"):
            if key not in obj:
                return (f"missing '{key}': a preference example is {{\"input\": {{\"messages\": [...]}}, "
                        "\"preferred_output\": [assistant message], \"non_preferred_output\": [assistant message]}")
        if not isinstance(obj["input"], dict) or "messages" not in obj["input"]:
            return "'input' must be an object with 'messages' (the conversation so far)"
        problem = _messages(obj["input"]["messages"], "input.messages")
        if problem:
            return problem
        for key in ("preferred_output", "non_preferred_output"):
            problem = _messages(obj[key], key)
            if problem:
                return problem
            if any(m["role"] != "assistant" for m in obj[key]):
                return f"'{key}' must hold assistant messages only"
        if _text(obj["preferred_output"]) == _text(obj["non_preferred_output"]):
            return "'preferred_output' and 'non_preferred_output' are the same reply, so there is nothing to prefer"
        return None
    return None  # records: the task reads them when the job is validated


def _messages(messages, key: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{key}' must be a non-empty list of {{\"role\", \"content\"}} objects"
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            return f"{key}[{i}] must be an object {{\"role\", \"content\"}}"
        if m.get("role") not in ROLES:
            return (f"{key}[{i}] has role {json.dumps(m.get('role'))}; roles are {', '.join(ROLES)} (tool and "
                    "function messages cannot be trained on here)")
        if m.get("weight", 1) not in (0, 1):
            return f"{key}[{i}] has weight {json.dumps(m.get('weight'))}; weight is 0 or 1"
        if m.get("weight", 1) == 0:
            return f"{key}[{i}] has weight 0; this server trains on every assistant message (remove the weight)"
        if content_text(m.get("content")) is None:
            return f"{key}[{i}] 'content' must be a string (or a list of text parts)"
    return None


def content_text(content) -> str | None:
    """A message's content as text: a string, or OpenAI's list of ``{"type": "text", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _text(messages) -> list:
    return [(m["role"], content_text(m["content"]).strip()) for m in messages]


def _validate_table(path: Path, sep: str, max_rows: int) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadUpload(f"not UTF-8 text (byte {err.start + 1}); save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise BadUpload("line 1: the file has no header row (column names)", 1)
    rows = 0
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise BadUpload(f"line {reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                            f"({', '.join(header)}); quote fields that hold the separator", reader.line_num)
        rows += 1
        if rows > max_rows:
            raise BadUpload(f"line {reader.line_num}: more than {max_rows} rows (this server's limit)", reader.line_num)
    if not rows:
        raise BadUpload("the file has a header but no rows", 2)
    return rows


# --------------------------------------------------------------------------- what a run reads

def training_copy(source: Path, kind: str, target_stem: Path, filename: str = "") -> Path:
    """Write the file a run reads: chat and preference examples in tuneforge's own shapes
    (``llm/formats.py``), records and tables as they are. Returns the path written."""
    if kind == "table":
        out = target_stem.with_suffix(".tsv" if filename.lower().endswith(".tsv") else ".csv")
        _atomic_write(out, Path(source).read_bytes())
        return out
    out = target_stem.with_suffix(".jsonl")
    lines = []
    for raw in Path(source).read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        obj = json.loads(raw)
        if kind == "chat":
            obj = {"messages": _plain(obj["messages"])}
        elif kind == "preference":
            obj = {"prompt": _plain(obj["input"]["messages"]), "chosen": _plain(obj["preferred_output"]),
                   "rejected": _plain(obj["non_preferred_output"])}
        lines.append(json.dumps(obj, ensure_ascii=False))
    _atomic_write(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return out


def _plain(messages: list) -> list:
    """OpenAI messages -> tuneforge's: ``developer`` is the newer name of ``system``; text parts joined."""
    return [{"role": "system" if m["role"] == "developer" else m["role"], "content": content_text(m["content"])}
            for m in messages]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
