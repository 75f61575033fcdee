"""Seeded, stratified train / held-out splits and label counts.

A held-out set carved from the training file must keep the class balance of the whole
(otherwise a rare class can vanish from validation and its metric silently disappears),
and must be the same split on every run with the same seed, so results are comparable.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from tuneforge.errors import TuneforgeError

__all__ = ["label_counts", "stratified_split"]

T = TypeVar("T")


def _key(label: object) -> Hashable:
    # Multi-label values are lists; stratify on the (sorted) label set.
    if isinstance(label, (list, tuple, set)):
        return tuple(sorted(map(str, label)))
    return label


def stratified_split(records: Sequence[T], label_fn: Callable[[T], object], fraction: float, seed: int,
                     *, hint: str | None = None) -> tuple[list[T], list[T]]:
    """Split off ``fraction`` of ``records`` as a held-out set, stratified by ``label_fn``.

    Deterministic for a given ``seed``; both parts keep the records' original order.
    When stratifying is impossible (a class with a single example, or fewer held-out
    slots than classes) it falls back to a plain seeded shuffle split and says so with a
    ``UserWarning`` (the caller may record it in the run log). Afterwards every class
    that has examples keeps at least one of them in train.
    ``hint`` names the recipe key that set ``fraction`` in the error for a bad value.
    """
    from sklearn.model_selection import train_test_split  # lazy: sklearn import is slow

    if not 0.0 < fraction < 1.0:
        raise TuneforgeError(f"held-out fraction must be between 0 and 1 (exclusive), got {fraction} — "
                             f"set {hint or 'the validation fraction in the recipe'} to e.g. 0.1")
    n = len(records)
    if n < 2:
        raise TuneforgeError(f"cannot split {n} record(s) into train and held-out parts — add data, or provide "
                             "a separate validation file")
    keys = [_key(label_fn(r)) for r in records]
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    y = [codes[k] for k in keys]
    counts = Counter(y)
    indices = list(range(n))

    note = None
    if min(counts.values()) < 2:
        rare = [str(k) for k, code in codes.items() if counts[code] < 2]
        note = f"class(es) {', '.join(rare[:10])} have a single example"
    else:
        try:
            train_idx, held_idx = train_test_split(indices, test_size=fraction, random_state=seed, stratify=y)
        except ValueError as e:  # e.g. fewer held-out slots than classes
            note = str(e)
    if note is not None:
        warnings.warn(f"stratified split not possible ({note}); using a plain seeded random split instead",
                      UserWarning, stacklevel=2)
        train_idx, held_idx = train_test_split(indices, test_size=fraction, random_state=seed)

    train_idx, held_idx = set(train_idx), sorted(held_idx)
    # A class that landed entirely in held-out could never be learnt: move one example back.
    in_train = {y[i] for i in train_idx}
    for i in list(held_idx):
        if y[i] not in in_train and len(held_idx) > 1:
            held_idx.remove(i)
            train_idx.add(i)
            in_train.add(y[i])
    return [records[i] for i in sorted(train_idx)], [records[i] for i in held_idx]


def label_counts(records: Sequence[T], label_fn: Callable[[T], object]) -> dict:
    """``{label: count}`` sorted by label; each label of a multi-label list counts once."""
    counts: Counter = Counter()
    for r in records:
        label = label_fn(r)
        counts.update(label if isinstance(label, (list, tuple, set)) else [label])
    # Group by type first so mixed int/str labels never get compared with each other.
    def order(kv: tuple) -> tuple:
        k = kv[0]
        return type(k).__name__, k if isinstance(k, (int, float, str)) else str(k)

    return dict(sorted(counts.items(), key=order))
