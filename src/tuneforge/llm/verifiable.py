"""Verifiable tasks generated from a seed, for RL with verifiable rewards (``tuneforge
make-grpo-data``): prompts whose answer a program checks, written as GRPO JSONL
(``prompt`` + ``answer``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import TuneforgeError

ADDITION_PROMPT = "What is {a} + {b}? Reply with only the equation and its result."


def addition_problems(n_train: int, n_validation: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Two-digit additions (10..99 + 10..99) as prompts with their ``answer``; the held-out pairs
    (a, b) never occur in training. Deterministic in ``seed``."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    if n_train + n_validation > len(pairs):
        raise TuneforgeError(f"only {len(pairs)} two-digit additions exist; ask for fewer than "
                             f"{n_train + n_validation}")
    random.Random(seed).shuffle(pairs)

    def row(a, b):
        return {"prompt": ADDITION_PROMPT.format(a=a, b=b), "answer": str(a + b)}

    return [row(*p) for p in pairs[:n_train]], [row(*p) for p in pairs[n_train:n_train + n_validation]]


def write_addition_data(directory, n_train: int = 400, n_validation: int = 64, seed: int = 0) -> dict:
    """``train.jsonl`` and ``validation.jsonl`` of :func:`addition_problems` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, validation = addition_problems(n_train, n_validation, seed)
    out = {}
    for name, rows in (("train", train), ("validation", validation)):
        path = directory / f"{name}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        out[name] = str(path)
    return out
