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
- ``sharegpt``:          ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}``
                          (LLaMA-Factory's and FastChat's shape; also under ``messages``). ``from``:
                          human/user -> user, gpt/assistant -> assistant, system -> system; an
                          optional top-level ``system`` string becomes the first system message.
                          Tool turns (function_call, observation, tool) are refused: nothing here
                          renders them. As preference data: ``conversations`` is the prompt and
                          ``chosen``/``rejected`` are one message ``{"from": "gpt", "value": ...}``,
                          a list of messages (a leading copy of the prompt is dropped), or a string.

A JSON file may hold one array of records (``alpaca_en_demo.json``) instead of one record a line.
When ShareGPT fields are read, one line per file says what became what.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
    "sharegpt": '{"conversations": [{"from": "human|gpt|system", "value": "..."}, ...], "system": "... (optional)"}',
    "sharegpt-preference": '{"conversations": [{"from": "human", "value": "..."}], "chosen": {"from": "gpt", '
                           '"value": "..."}, "rejected": {"from": "gpt", "value": "..."}}',
}
# ShareGPT speaker tags (LLaMA-Factory's defaults human/gpt/system, and the user/assistant it also writes)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_TOOL_ROLES = ("function_call", "observation", "tool", "function", "ipython")
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
                    preference: bool = False, log: Callable[[str], None] | None = None) -> list[Record]:
    """JSONL / JSON (an array of objects) / TXT -> records whose ``values`` are
    ``{"format": ..., "messages": [...]}`` (or ``prompt``/``chosen``/``rejected`` for preference data).
    ``log`` gets one line per file naming how ShareGPT fields were mapped, when there were any."""
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
    mapped: dict[str, None] = {}  # the ShareGPT field mappings seen, in first-seen order
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
        for m in values.pop("mapped", ()):
            mapped.setdefault(m)
        out.append(Record(values, where))
    if mapped and log is not None:
        log(f"{path.name}: ShareGPT: {', '.join(sorted(mapped, key=_mapping_order))}")
    return out


def _mapping_order(mapping: str) -> tuple:
    """ShareGPT mappings in reading order: the top-level system, the turns (system, human, gpt), the replies."""
    role = mapping.rsplit("-> ", 1)[-1]
    field = 1 if "[from=" in mapping else 0 if mapping.startswith("system") else 2
    roles = ("system", "user", "assistant", "chosen reply", "rejected reply")
    return field, roles.index(role) if role in roles else len(roles)  # ties keep first-seen order (stable sort)


def _json_rows(path: Path, encoding: str):
    text = path.read_text(encoding=encoding)
    if path.suffix.lower() == ".json":
        try:
            items = _json_array_items(text)
        except json.JSONDecodeError as e:
            raise TuneforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                 "fix the file, or save one object per line as .jsonl") from None
        if items is None:
            kind = type(json.loads(text)).__name__
            raise TuneforgeError(f"{path}: a .json data file must hold an array of records, got {kind}")
        return [(f"{path.name} item {i + 1} (line {line})", obj) for i, (line, obj) in enumerate(items)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path.name} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((f"{path.name} line {n}", _Bad(f"not valid JSON ({e.msg}, column {e.colno})")))
    return rows


def _json_array_items(text: str) -> list[tuple[int, object]] | None:
    """``[(line where the item starts, item), ...]`` of a JSON array, or None when the text is another JSON
    value. Decoded item by item (``raw_decode``) so a bad record can be named by its line."""
    decoder, n = json.JSONDecoder(), len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    if i < n and text[i] == "\ufeff":  # a byte-order mark
        i = skip(i + 1)
    if i >= n or text[i] != "[":
        json.loads(text)  # raises the decoder's own error for invalid JSON
        return None
    items, line, counted = [], 1, 0
    i = skip(i + 1)
    if i < n and text[i] == "]":
        return items
    while True:
        line += text.count("\n", counted, i)
        counted = i
        obj, i = decoder.raw_decode(text, i)
        items.append((line, obj))
        i = skip(i)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip(i + 1) != n:
                json.loads(text)  # trailing data: the decoder's error names where
            return items
        json.loads(text)  # a missing comma or bracket: the decoder's error names where
        raise json.JSONDecodeError("expected ',' or ']'", text, i)


class _Bad:
    def __init__(self, why: str):
        self.why = why


def _sharegpt_key(obj: dict) -> str | None:
    """``conversations`` (or ``messages`` holding ``from``/``value`` turns): the key of ShareGPT turns."""
    if "conversations" in obj:
        return "conversations"
    turns = obj.get("messages")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
        return "messages"
    return None


def detect(obj: dict) -> str | None:
    if _sharegpt_key(obj):
        return "sharegpt"
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
                             f"language-model data shapes — {_expected(['chat', 'sharegpt', 'prompt-completion', 'alpaca', 'text'])}")
    if kind == "sharegpt":
        key = _sharegpt_key(obj)
        if key is None:
            raise TuneforgeError(f"{where}: task.format is sharegpt but the record has no 'conversations' — "
                                 f"{SHAPES['sharegpt']}")
        messages, mapped = sharegpt_turns(obj[key], where, key, system=_system_field(obj, where))
        if not any(m["role"] == "assistant" for m in messages):
            raise TuneforgeError(f"{where}: the conversation has no gpt/assistant turn, so there is nothing to learn")
        return {"format": "chat", "messages": messages, "mapped": mapped}
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


def _check_pair(chosen: list[dict], rejected: list[dict], where: str) -> None:
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise TuneforgeError(f"{where}: '{name}' must end with an assistant reply")
    if [(t["role"], t["content"].strip()) for t in chosen] == [(t["role"], t["content"].strip()) for t in rejected]:
        # the DPO/SimPO loss of such a pair is a constant (log 2): it teaches nothing, and a file full of
        # them is usually a column mapped twice
        raise TuneforgeError(f"{where}: 'chosen' and 'rejected' are the same reply, so there is nothing to prefer "
                             "— fix the pair or delete it")


def _turns(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if isinstance(value, list):
        return check_messages(value, f"{where} '{key}'")
    raise TuneforgeError(f"{where}: '{key}' must be a non-empty string or a list of messages — {SHAPES['preference']}")


def _system_field(obj: dict, where: str) -> str | None:
    system = obj.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return None
    if not isinstance(system, str):
        raise TuneforgeError(f"{where}: 'system' must be a string (the system prompt), got {json.dumps(system)[:60]}")
    return system


def sharegpt_turns(turns, where: str, key: str = "conversations", *, system: str | None = None,
                   allow_empty: bool = False) -> tuple[list[dict], list[str]]:
    """ShareGPT turns -> ``{"role", "content"}`` messages, and the mappings used (``key[from=gpt] -> assistant``)."""
    if not isinstance(turns, list) or (not turns and not allow_empty):
        raise TuneforgeError(f"{where}: '{key}' must be a non-empty list of {{\"from\", \"value\"}} turns — "
                             f"{SHAPES['sharegpt']}")
    messages, mapped = [], []
    if system is not None:
        messages.append({"role": "system", "content": system})
        mapped.append("system -> system message")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or not isinstance(turn.get("from"), str):
            raise TuneforgeError(f"{where}: {key} turn {i + 1} must be {{\"from\": \"human|gpt|system\", \"value\": a "
                                 f"string}}, got {json.dumps(turn)[:80]}")
        speaker = turn["from"]
        if speaker in SHAREGPT_TOOL_ROLES:
            raise TuneforgeError(f"{where}: {key} turn {i + 1} is a '{speaker}' turn (tool use); tuneforge trains on "
                                 "human/gpt/system turns only — remove the tool turns from this record")
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise TuneforgeError(f"{where}: {key} turn {i + 1} is from '{speaker}'; ShareGPT turns are from "
                                 f"{', '.join(SHAREGPT_ROLES)} (or the tool roles, which are not supported)")
        if role == "system" and (messages and not (i == 0 and system is None)):
            raise TuneforgeError(f"{where}: {key} turn {i + 1} is a system turn after the start of the conversation"
                                 + (" (and the record also has a top-level 'system')" if system is not None else "")
                                 + "; keep one system prompt, first")
        messages.append({"role": role, "content": turn["value"]})
        mapped.append(f"{key}[from={speaker}] -> {role}")
    return messages, mapped


def _sharegpt_reply(value, prompt: list[dict], where: str, name: str) -> tuple[list[dict], str]:
    """A ShareGPT preference reply: one message, a list of messages, or a string -> assistant turns."""
    if isinstance(value, str):
        if not value.strip():
            raise TuneforgeError(f"{where}: '{name}' is an empty reply")
        return [{"role": "assistant", "content": value}], f"{name} -> {name} reply"
    if isinstance(value, dict):
        turns, _ = sharegpt_turns([value], where, name)
        if not turns[0]["content"].strip():
            raise TuneforgeError(f"{where}: '{name}' is an empty reply")
        return turns, f"{name}.value -> {name} reply"
    if isinstance(value, list):
        turns, _ = sharegpt_turns(value, where, name)
        if turns[: len(prompt)] == prompt and len(turns) > len(prompt):
            turns = turns[len(prompt):]  # the whole conversation repeated: keep what follows the prompt
            return turns, f"{name}[after the prompt] -> {name} reply"
        return turns, f"{name}[...] -> {name} reply"
    raise TuneforgeError(f"{where}: '{name}' must be a message {{\"from\": \"gpt\", \"value\": ...}}, a list of "
                         f"messages or a string — {SHAPES['sharegpt-preference']}")


def sharegpt_preference(obj: dict, where: str) -> dict:
    key = _sharegpt_key(obj)
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise TuneforgeError(f"{where}: a ShareGPT preference record needs {', '.join(missing)} besides '{key}' — "
                             f"{SHAPES['sharegpt-preference']}")
    prompt, mapped = sharegpt_turns(obj[key], where, key, system=_system_field(obj, where))
    if prompt[-1]["role"] != "user":
        last = prompt[-1]["role"]
        raise TuneforgeError(f"{where}: '{key}' must end with a human turn (the prompt the replies answer); its last "
                             f"turn is {'an' if last == 'assistant' else 'a'} {last} turn")
    chosen, how_chosen = _sharegpt_reply(obj["chosen"], prompt, where, "chosen")
    rejected, how_rejected = _sharegpt_reply(obj["rejected"], prompt, where, "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "mapped": mapped + [how_chosen, how_rejected]}


def to_preference(obj, where: str) -> dict:
    if isinstance(obj, _Bad):
        raise TuneforgeError(f"{where}: {obj.why}")
    if _sharegpt_key(obj) and "prompt" not in obj:
        pair = sharegpt_preference(obj, where)
        _check_pair(pair["chosen"], pair["rejected"], where)
        return {"format": "preference", "prompt": pair["prompt"], "chosen": pair["chosen"],
                "rejected": pair["rejected"], "chat": True, "mapped": pair["mapped"]}
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise TuneforgeError(f"{where}: a preference record needs {', '.join(missing)} — {SHAPES['preference']}; or "
                             f"ShareGPT: {SHAPES['sharegpt-preference']}")
    chosen, rejected = _turns(obj["chosen"], where, "chosen"), _turns(obj["rejected"], where, "rejected")
    _check_pair(chosen, rejected, where)
    return {"format": "preference", "prompt": _turns(obj["prompt"], where, "prompt"), "chosen": chosen,
            "rejected": rejected,
            # message lists are chat data (a chat template under `auto`), strings are prompt/completion data
            "chat": any(isinstance(obj[k], list) for k in ("prompt", "chosen", "rejected"))}
