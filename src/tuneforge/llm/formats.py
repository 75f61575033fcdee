"""Reading instruction / chat / plain-text / preference data into one shape.

Every supported record becomes a *conversation*: a list of ``{"role", "content"}``
turns (roles ``system``, ``user``, ``assistant``), or, for plain text, a single
``{"role": "text"}`` turn that is trained on in full. Preference records keep a
shared prompt conversation plus the chosen and rejected assistant replies.

Accepted shapes (``task.format: auto`` picks by the keys of each record):

- ``chat``:              ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ``prompt-completion``: ``{"prompt": "...", "completion": "..."}``
- ``alpaca``:            ``{"instruction": "...", "input": "...", "output": "..."}`` (input optional)
- ``text``:              ``{"text": "..."}`` (``data.text_column``), or a ``.txt`` file whose
                          blank-line separated paragraphs are the documents
- ``preference``:        ``{"prompt": "..." | [messages], "chosen": "..." | [messages],
                          "rejected": "..." | [messages]}``; a pair whose chosen and rejected
                          replies are the same is a bad record
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.records import Record
from ..errors import TuneforgeError

ROLES = ("system", "user", "assistant")
SHAPES = {
    "chat": '{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}',
    "prompt-completion": '{"prompt": "...", "completion": "..."}',
    "alpaca": '{"instruction": "...", "input": "... (optional)", "output": "..."}',
    "text": '{"text": "..."} (or a .txt file: paragraphs separated by blank lines)',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."} (strings or message lists)',
}
# Alpaca's own prompt (Taori et al. 2023), so models tuned on Alpaca data answer the way its users expect.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def _expected(formats) -> str:
    return "; ".join(f"{f}: {SHAPES[f]}" for f in formats)


def read_lm_records(path: str | Path, *, fmt: str = "auto", text_key: str = "text", limit: int | None = None,
                    on_bad_record: str = "error", skipped: list | None = None, encoding: str = "utf-8",
                    preference: bool = False) -> list[Record]:
    """JSONL / JSON (an array of objects) / TXT -> records whose ``values`` are
    ``{"format": ..., "messages": [...]}`` (or ``prompt``/``chosen``/``rejected`` for preference data)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise TuneforgeError(f"{path} is a folder; language-model data is a .jsonl, .json or .txt file")
    if suffix == ".txt":
        if preference or fmt not in ("auto", "text"):
            raise TuneforgeError(f"{path}: a .txt file holds plain text only; task.format {fmt} needs JSONL "
                                 f"records ({_expected(['preference'] if preference else [fmt])})")
        paragraphs = [p.strip() for p in path.read_text(encoding=encoding).split("\n\n")]
        records = [Record({"format": "text", "messages": [{"role": "text", "content": p}]}, f"{path.name} paragraph {i + 1}")
                   for i, p in enumerate(x for x in paragraphs if x)]
        return records[:limit] if limit else records
    if suffix not in (".jsonl", ".json"):
        raise TuneforgeError(f"{path}: language-model data must be .jsonl (one JSON object per line), .json (an array "
                             f"of objects) or .txt; got '{suffix or 'no extension'}'. Convert the file, e.g. with "
                             "pandas: df.to_json(PATH, orient='records', lines=True)")
    rows = _json_rows(path, encoding)
    out: list[Record] = []
    for where, obj in rows:
        if limit and len(out) >= limit:
            break
        try:
            if not isinstance(obj, dict):
                raise TuneforgeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            values = to_preference(obj, where) if preference else to_conversation(obj, fmt, text_key, where)
        except TuneforgeError as err:
            if on_bad_record == "skip":
                if skipped is not None:
                    skipped.append(str(err))
                continue
            raise TuneforgeError(f"{err} (or set data.on_bad_record: skip to leave such records out)") from None
        out.append(Record(values, where))
    return out


def _json_rows(path: Path, encoding: str):
    text = path.read_text(encoding=encoding)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TuneforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                 "fix the file, or save one object per line as .jsonl") from None
        if not isinstance(data, list):
            raise TuneforgeError(f"{path}: a .json data file must hold an array of records, got {type(data).__name__}")
        return [(f"{path.name} item {i + 1}", obj) for i, obj in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path.name} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((f"{path.name} line {n}", _Bad(f"not valid JSON ({e.msg}, column {e.colno})")))
    return rows


class _Bad:
    def __init__(self, why: str):
        self.why = why


def detect(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "prompt-completion"
    if "text" in obj:
        return "text"
    return None


def _string(obj: dict, key: str, where: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not value.strip() and not optional):
        raise TuneforgeError(f"{where}: '{key}' must be a non-empty string, got {json.dumps(value)[:60]}")
    return value


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TuneforgeError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TuneforgeError(f"{where}: message {i + 1} must be {{\"role\": one of {', '.join(ROLES)}, "
                                 f"\"content\": a string}}, got {json.dumps(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_conversation(obj, fmt: str, text_key: str, where: str) -> dict:
    if isinstance(obj, _Bad):
        raise TuneforgeError(f"{where}: {obj.why}")
    kind = detect(obj) if fmt == "auto" else fmt
    if text_key != "text" and kind in (None, "text") and text_key in obj:
        kind = "text"
    if kind is None:
        raise TuneforgeError(f"{where}: the record (keys: {', '.join(list(obj)[:8]) or 'none'}) fits none of the "
                             f"language-model data shapes — {_expected(['chat', 'prompt-completion', 'alpaca', 'text'])}")
    if kind == "chat":
        if "messages" not in obj:
            raise TuneforgeError(f"{where}: task.format is chat but the record has no 'messages' — {SHAPES['chat']}")
        messages = check_messages(obj["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise TuneforgeError(f"{where}: the conversation has no assistant message, so there is nothing to learn")
        return {"format": "chat", "messages": messages}
    if kind == "prompt-completion":
        return {"format": kind, "messages": [{"role": "user", "content": _string(obj, "prompt", where)},
                                             {"role": "assistant", "content": _string(obj, "completion", where)}]}
    if kind == "alpaca":
        extra = _string(obj, "input", where, optional=True)
        template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
        prompt = template.format(instruction=_string(obj, "instruction", where), input=extra)
        return {"format": kind, "messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": _string(obj, "output", where)}]}
    key = text_key if text_key in obj else "text"
    return {"format": "text", "messages": [{"role": "text", "content": _string(obj, key, where)}]}


def _turns(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if isinstance(value, list):
        return check_messages(value, f"{where} '{key}'")
    raise TuneforgeError(f"{where}: '{key}' must be a non-empty string or a list of messages — {SHAPES['preference']}")


def to_preference(obj, where: str) -> dict:
    if isinstance(obj, _Bad):
        raise TuneforgeError(f"{where}: {obj.why}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise TuneforgeError(f"{where}: a preference record needs {', '.join(missing)} — {SHAPES['preference']}")
    chosen, rejected = _turns(obj["chosen"], where, "chosen"), _turns(obj["rejected"], where, "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise TuneforgeError(f"{where}: '{name}' must end with an assistant reply")
    if [(t["role"], t["content"].strip()) for t in chosen] == [(t["role"], t["content"].strip()) for t in rejected]:
        # the DPO/SimPO loss of such a pair is a constant (log 2): it teaches nothing, and a file full of
        # them is usually a column mapped twice
        raise TuneforgeError(f"{where}: 'chosen' and 'rejected' are the same reply, so there is nothing to prefer "
                             "— fix the pair or delete it")
    return {"format": "preference", "prompt": _turns(obj["prompt"], where, "prompt"), "chosen": chosen,
            "rejected": rejected,
            # message lists are chat data (a chat template under `auto`), strings are prompt/completion data
            "chat": any(isinstance(obj[k], list) for k in ("prompt", "chosen", "rejected"))}
