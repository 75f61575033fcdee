"""Tag schemes of per-token tagging: IOB1, IOB2, BIOES, and ``none`` (plain tags such as POS).

Every tag sequence a user gives is read into entity spans in its own scheme, checked, and
written again in the scheme the model learns (``task.model_scheme``: IOB2 or BIOES). Spans
are ``(start, end, type)`` over word indices, ``end`` exclusive.

Reading an *input* sequence is lenient where the user chooses repair: an ``I-X`` that opens
an entity (after ``O`` or another type) in IOB2 starts a new ``X`` (conlleval's reading), a
BIOES entity that is never closed ends where it stops. With ``on_invalid_tag: error`` each such
place is an error naming the file line.

Reading the *model's* sequences for metrics and predictions is strict, seqeval's definition
(``mode="strict"``): in IOB2 an entity is a ``B-X`` and the ``I-X`` that follow it; an ``I-X``
that opens nothing is no entity. In BIOES it is ``S-X``, or ``B-X I-X* E-X``. Our own code
rather than seqeval's because metrics stream sentence by sentence (seqeval takes every
sequence of a split at once) and predictions need the same spans with scores and character
offsets; ``tests/tasks/test_token_classification_schemes.py`` checks both against seqeval.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import TuneforgeError

SCHEMES = ("iob1", "iob2", "bioes", "none")
MODEL_SCHEMES = ("iob2", "bioes")
OUTSIDE = "O"
_PREFIXED = re.compile(r"^([BIES])-(.+)$")

Span = tuple[int, int, str]


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``; anything else -> ``("", tag)``."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    m = _PREFIXED.match(tag)
    return (m.group(1), m.group(2)) if m else ("", tag)


def detect_scheme(sequences: Sequence[Sequence[str]]) -> tuple[str, str]:
    """(scheme, why) from the tags of one file. ``E-``/``S-`` prefixes mean BIOES. With only
    ``B-``/``I-``: IOB1 when some ``I-X`` opens an entity and every ``B-X`` follows an ``X``
    (IOB1 uses ``B-`` only between two touching entities of one type), else IOB2. No prefixes
    at all: ``none`` (each tag its own class, e.g. part-of-speech)."""
    prefixes: set[str] = set()
    i_opens = b_opens = 0
    for tags in sequences:
        prev_prefix, prev_type = OUTSIDE, ""
        for tag in tags:
            prefix, kind = split_tag(tag)
            prefixes.add(prefix)
            if prefix == "I" and not (prev_prefix in ("B", "I") and prev_type == kind):
                i_opens += 1
            if prefix == "B" and not (prev_prefix in ("B", "I") and prev_type == kind):
                b_opens += 1
            prev_prefix, prev_type = prefix, kind
    if prefixes & {"E", "S"}:
        return "bioes", "E-/S- prefixes occur"
    if not prefixes & {"B", "I"}:
        return "none", "no tag has a B-/I-/E-/S- prefix"
    if i_opens and not b_opens:
        return "iob1", f"{i_opens} entities open with I- and every B- follows an entity of its type"
    return "iob2", "entities open with B-"


def read_spans(tags: Sequence[str], scheme: str, *, repair: bool, where=lambda i: f"word {i + 1}") -> tuple[list[Span], list[str]]:
    """Entity spans of a user's tag sequence in ``scheme`` -> (spans, problems repaired).

    ``where(i)``: names word ``i`` in messages ("train.txt line 12"). Without ``repair`` the
    first invalid place raises an error naming it and both ways to fix it."""
    spans: list[Span] = []
    repaired: list[str] = []
    open_start, open_type, open_prefix = None, "", OUTSIDE

    def invalid(i: int, problem: str) -> None:
        message = f"{where(i)}: {problem}"
        if not repair:
            raise TuneforgeError(f"{message} — fix the tag, set task.scheme to the file's real scheme, or set "
                                 "task.on_invalid_tag: repair to read it as a new entity (counted in the log)")
        repaired.append(message)

    def close(end: int) -> None:
        nonlocal open_start, open_type
        if open_start is not None:
            spans.append((open_start, end, open_type))
        open_start, open_type = None, ""

    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        if scheme == "none":
            if prefix != OUTSIDE:
                spans.append((i, i + 1, tag))
            continue
        if prefix == "":
            raise TuneforgeError(f"{where(i)}: tag '{tag}' is neither O nor prefixed B-/I-"
                                 f"{'/E-/S-' if scheme == 'bioes' else ''} as task.scheme {scheme} needs — fix the "
                                 "tag, or set task.scheme: none if the tags are plain classes (e.g. part-of-speech)")
        if scheme != "bioes" and prefix in ("E", "S"):
            raise TuneforgeError(f"{where(i)}: tag '{tag}' has a BIOES prefix but task.scheme is {scheme} — set "
                                 "task.scheme: bioes (or auto)")
        continues = open_start is not None and open_type == kind and open_prefix in ("B", "I")
        if prefix == OUTSIDE:
            if scheme == "bioes" and open_start is not None:
                invalid(i - 1, f"entity {open_type} is not closed with E- before O")
            close(i)
        elif prefix == "B":
            if scheme == "bioes" and open_start is not None:
                invalid(i - 1, f"entity {open_type} is not closed with E- before {tag}")
            close(i)
            open_start, open_type = i, kind
        elif prefix == "I":
            if not continues:
                if scheme == "iob2" or scheme == "bioes":
                    invalid(i, f"'{tag}' follows '{tags[i - 1] if i else '(sentence start)'}', so it continues "
                               f"no {kind} entity (scheme {scheme})")
                close(i)
                open_start, open_type = i, kind
        elif prefix == "E":
            if not continues:
                invalid(i, f"'{tag}' follows '{tags[i - 1] if i else '(sentence start)'}', so it ends no {kind} "
                           "entity (scheme bioes)")
                close(i)
                open_start, open_type = i, kind
            close(i + 1)
            prefix = OUTSIDE
        elif prefix == "S":
            if open_start is not None:
                invalid(i - 1, f"entity {open_type} is not closed with E- before {tag}")
            close(i)
            spans.append((i, i + 1, kind))
            prefix = OUTSIDE
        open_prefix = prefix
    if scheme == "bioes" and open_start is not None:
        invalid(len(tags) - 1, f"entity {open_type} is not closed with E- at the end of the sentence")
    close(len(tags))
    return spans, repaired


def write_tags(spans: Sequence[Span], length: int, scheme: str) -> list[str]:
    """Spans -> one tag per word in ``scheme`` (``iob2``, ``bioes`` or ``none``)."""
    tags = [OUTSIDE] * length
    for start, end, kind in spans:
        if scheme == "none":
            tags[start] = kind
            continue
        if scheme == "bioes" and end - start == 1:
            tags[start] = f"S-{kind}"
            continue
        tags[start] = f"B-{kind}"
        for j in range(start + 1, end):
            tags[j] = f"I-{kind}"
        if scheme == "bioes":
            tags[end - 1] = f"E-{kind}"
    return tags


def tag_names(types: Sequence[str], scheme: str) -> list[str]:
    """The model's classes: O first (index 0: what an untaggable word is read as), then each
    type's tags in scheme order."""
    if scheme == "none":
        return [OUTSIDE, *[t for t in sorted(types) if t != OUTSIDE]]
    prefixes = "BIES" if scheme == "bioes" else "BI"
    return [OUTSIDE] + [f"{p}-{t}" for t in sorted(types) for p in prefixes]


def strict_spans(tags: Sequence[str], scheme: str) -> list[Span]:
    """seqeval's strict entities of a model-scheme sequence (see the module docstring)."""
    spans: list[Span] = []
    n, i = len(tags), 0
    if scheme == "none":
        return [(j, j + 1, t) for j, t in enumerate(tags) if t != OUTSIDE]
    while i < n:
        prefix, kind = split_tag(tags[i])
        if scheme == "bioes" and prefix == "S":
            spans.append((i, i + 1, kind))
            i += 1
        elif prefix == "B":
            j = i + 1
            while j < n and split_tag(tags[j]) == ("I", kind):
                j += 1
            if scheme == "iob2":
                spans.append((i, j, kind))
            elif j < n and split_tag(tags[j]) == ("E", kind):
                j += 1
                spans.append((i, j, kind))
            i = j  # the word that stopped the entity may open the next one
        else:
            i += 1
    return spans


def subword_tags(tag: str, pieces: int, scheme: str) -> list[str]:
    """``task.subtokens: all``: the tags of one word's ``pieces`` sub-tokens, so that the pieces
    read as the word's entity in ``scheme``: ``B-X`` -> ``B-X I-X ...``; BIOES ``E-X`` ->
    ``I-X ... E-X``, ``S-X`` -> ``B-X I-X ... E-X``; O and plain tags repeat."""
    if pieces <= 1:
        return [tag] * pieces
    prefix, kind = split_tag(tag)
    if prefix in (OUTSIDE, ""):
        return [tag] * pieces
    first = {"B": "B", "I": "I", "E": "I", "S": "B"}[prefix]
    last = {"B": "I", "I": "I", "E": "E", "S": "E"}[prefix]
    return [f"{first}-{kind}"] + [f"I-{kind}"] * (pieces - 2) + [f"{last}-{kind}"]


def allowed_transitions(names: Sequence[str], scheme: str):
    """(start (C,), transition (C, C), end (C,)) masks of the sequences ``strict_spans`` reads
    whole: constrained decoding keeps to them, so no predicted word is dropped from an entity."""
    import torch

    c = len(names)
    parts = [split_tag(n) for n in names]
    start, end = torch.ones(c, dtype=torch.bool), torch.ones(c, dtype=torch.bool)
    trans = torch.ones(c, c, dtype=torch.bool)
    if scheme == "none":
        return start, trans, end
    for j, (pj, tj) in enumerate(parts):
        if pj in ("I", "E"):
            start[j] = False
        if scheme == "bioes" and pj in ("B", "I"):
            end[j] = False
        for i, (pi, ti) in enumerate(parts):
            inside = pi in ("B", "I") and ti == tj
            if pj in ("I", "E"):
                trans[i, j] = inside
            elif scheme == "bioes" and pi in ("B", "I"):
                trans[i, j] = False  # an open BIOES entity continues with I- or ends with E- of its type
    return start, trans, end
