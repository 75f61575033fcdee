"""Rows shared between splits: a validation or test score on examples the model trained on.

``data.validation`` pointed at the training file, a test set cut from a copy of the training
data, a scraped corpus with repeated sentences: every one gives scores that look better than
the model is, and nothing else in a run would notice. Each record is reduced to a hash of its
*input* (the text, the image, the conversation; never its label or id, so a row relabelled in
the other split still counts) and each later split is compared with the earlier ones
(train <- validation <- test). Texts compare with their whitespace collapsed; images compare
by resolved path (or embedded bytes), so the same picture saved twice under two names is not
caught.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from ..errors import TuneforgeError
from .records import Record

__all__ = ["check_overlap", "input_digest"]

_NOT_INPUT = ("label", "id")  # roles that say what an example is called or is, not what it is
_ORDER = ("train", "validation", "test")


def input_digest(values: dict) -> bytes:
    """A 16-byte digest of a record's input roles (all but label and id)."""
    h = hashlib.blake2b(digest_size=16)
    for role in sorted(values):
        if role in _NOT_INPUT:
            continue
        value = values[role]
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            data = " ".join(value.split()).encode()
        else:  # conversations and preference pairs: lists and dicts of strings
            data = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()
        h.update(role.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.digest()


def check_overlap(splits: dict[str, list[Record]], *, allow: bool, log: Callable[[str], None],
                  paths: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Count the rows of each split whose input also occurs in an earlier split.

    Returns ``{later: {earlier: rows}}`` for every pair that shares rows. Logs one warning
    per pair; with ``allow=False`` the first pair is an error instead. ``paths``: split -> the
    recipe's path, to say when two splits are simply the same file.
    """
    seen: dict[str, dict[bytes, str]] = {}  # split -> digest -> where it first occurs
    found: dict[str, dict[str, int]] = {}
    for split in [s for s in _ORDER if s in splits] + [s for s in splits if s not in _ORDER]:
        digests = [(input_digest(r.values), r.where) for r in splits[split]]
        for earlier, index in seen.items():
            shared = [(where, index[d]) for d, where in digests if d in index]
            if not shared:
                continue
            found.setdefault(split, {})[earlier] = len(shared)
            message = _describe(split, earlier, shared, len(digests), paths or {})
            if not allow:
                raise TuneforgeError(
                    f"{message} — remove the shared rows from one of the files (or point data.{split} at data that "
                    "does not repeat the other split), or set data.allow_overlap: true to train anyway with a warning"
                )
            log(f"[yellow]warning: {message}[/]: its scores overstate how the model does on new data "
                "(data.allow_overlap: false makes this an error)")
        seen[split] = {}
        for d, where in digests:
            seen[split].setdefault(d, where)
    return found


def _describe(split: str, earlier: str, shared: list[tuple[str, str]], total: int, paths: dict) -> str:
    same_file = paths.get(split) is not None and paths.get(split) == paths.get(earlier)
    why = f" (data.{split} and data.{earlier} are the same file)" if same_file else ""
    where, first = shared[0]
    return (f"{split} shares {len(shared)} of its {total} rows with {earlier}{why}, by the hash of their input "
            f"(e.g. {where} = {first})")
