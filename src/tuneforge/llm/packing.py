"""Packing short examples into rows of ``max_length`` tokens, without cross-example attention.

Each example keeps its own position ids (restarting at 0), and the first token of each
example carries no loss (it has no predecessor in its own text). The model is called
with these position ids and *no* 2-D attention mask: Hugging Face models then build a
block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``),
so a token sees only earlier tokens of its own example — the loss of a packed row equals
the summed losses of its examples run one by one (tested). Padding at a row's end gets
position 0 at every token: each padding token is its own one-token "example" and carries
no loss.
"""

from __future__ import annotations

from .templates import IGNORE


def pack(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[dict]:
    """Best-fit decreasing bin packing of (ids, labels) examples into rows of at most ``max_length``.

    -> rows ``{"input_ids", "labels", "position_ids", "members"}``, ``members`` the example
    indices in the row (for error messages). Deterministic: the same examples give the same rows.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[dict] = []
    free: list[int] = []  # room left in each row
    for i in order:
        n = len(examples[i][0])
        # best fit: the fullest row that still has room (linear scan: data sets here are small
        # enough that this costs milliseconds; a sorted structure would not be simpler)
        best, room = -1, max_length + 1
        for r, f in enumerate(free):
            if n <= f < room:
                best, room = r, f
        if best < 0:
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "members": []})
            free.append(max_length)
            best = len(rows) - 1
        ids, labels = examples[i]
        row = rows[best]
        row["input_ids"] += ids
        row["labels"] += [IGNORE] + labels[1:]
        row["position_ids"] += list(range(n))
        row["members"].append(i)
        free[best] -= n
    return rows
