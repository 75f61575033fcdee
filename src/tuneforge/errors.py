"""The one error type for user mistakes.

Every message names *where* (file, line/row, field) and *how to fix it*. The
CLI prints a ``TuneforgeError`` as one clean paragraph without a traceback;
anything else is a bug in tuneforge and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TuneforgeError(Exception):
    """A problem with the user's input (recipe, data, paths, model): the message says what to change."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the nearest choice, or ``""``."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
