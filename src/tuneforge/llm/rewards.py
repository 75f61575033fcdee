"""Rewards for online RL (``task.type: grpo``): what a sampled completion is worth.

A reward scores one completion of one prompt: ``score(completions, tokens, records, wheres)``
takes the decoded completions (stop token removed), their token counts (stop token included),
the data records they answer (every field of the JSONL row, e.g. ``answer``) and where each
record comes from, and returns one float per completion. ``task.rewards`` is a list of them
with weights; a completion's reward is the weighted sum.

Built-ins (``type``):

- ``exact_match``: the answer extracted by ``pattern`` (the *last* match in the completion:
  a model that restates the question and then answers is judged by its answer; group 1 when the
  pattern has a group, else the whole match; no pattern: the whole stripped completion) equals
  the record's ``field``. Numbers compare by value (``57``, ``57.0`` and ``+57`` are one answer),
  other text after collapsing whitespace. 1 or 0: its mean is the fraction correct.
- ``regex``: 1 if ``pattern`` occurs anywhere in the completion (``re.search``), else 0.
- ``format``: 1 if the whole stripped completion matches ``pattern`` (``re.fullmatch``), else 0.
- ``length_penalty``: ``-max(0, tokens - free_tokens) / (max_new_tokens - free_tokens)``, from
  0 down to -1 at the longest completion (the linear "overlong" shaping of DAPO, Yu et al. 2025).
- ``function``: the user's own ``def f(completion: str, record: dict) -> float``, named
  ``module:function``. **This executes the user's Python code**, and only code from a file the
  recipe itself names in ``task.reward_paths``: ``module`` must be the stem of one of those
  files (``my_rewards:score`` with ``reward_paths: [./my_rewards.py]``). Nothing is ever imported
  from the data, from ``sys.path`` or from installed packages by name; a ``module:function``
  without such a file is refused. To use an installed package, write a two-line file that imports
  it and name that file.

A reward function that raises, or returns anything but a finite real number, stops the run with
an error naming the function, the record and the completion.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable

from ..errors import TuneforgeError

BUILTINS = ("exact_match", "regex", "format", "length_penalty")
TYPES = BUILTINS + ("function",)
_SPEC = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):([A-Za-z_][A-Za-z0-9_]*)")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


@dataclass
class Reward:
    """One named, weighted reward; ``fn(completion, tokens, record) -> value``."""

    name: str
    weight: float
    fn: Callable[[str, int, dict], Any]
    origin: str  # what an error calls it: "exact_match" or "score in /path/my_rewards.py"
    field: str | None = None  # the record field it reads (checked when the data is read)

    def score(self, completions: list[str], tokens: list[int], records: list[dict], wheres: list[str]) -> list[float]:
        out = []
        for text, n, record, where in zip(completions, tokens, records, wheres):
            try:
                value = self.fn(text, n, record)
            except TuneforgeError:
                raise
            except Exception as err:  # noqa: BLE001 - the user's code: any failure is reported, with context
                raise TuneforgeError(
                    f"reward {self.origin} raised {type(err).__name__}: {err} — on the completion {_shown(text)} of "
                    f"{where}; fix the function (it must accept every completion the model can write, including "
                    "empty and unfinished ones)") from err
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise TuneforgeError(
                    f"reward {self.origin} returned {_shown(value)} ({type(value).__name__}) for the completion "
                    f"{_shown(text)} of {where}; a reward must be a finite int or float (True/False: return 1.0/0.0)")
            out.append(float(value))
        return out


def _shown(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


# --------------------------------------------------------------------------- built-ins

def _normal(text: str) -> tuple:
    """What makes two answers one: the value of a number, else the whitespace-collapsed text."""
    text = " ".join(str(text).split())
    if _NUMBER.fullmatch(text):
        try:
            return ("number", Decimal(text).normalize())
        except InvalidOperation:
            pass
    return ("text", text)


def extract(completion: str, pattern: re.Pattern | None) -> str | None:
    """The answer in a completion: the last match of ``pattern`` (group 1 when it has groups)."""
    if pattern is None:
        return completion.strip()
    last = None
    for last in pattern.finditer(completion):
        pass
    if last is None:
        return None
    return last.group(1) if pattern.groups else last.group(0)


def _compile(pattern: str | None, where: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise TuneforgeError(f"{where}: pattern {pattern!r} is not a valid Python regex ({err})") from None


def _exact_match(pattern: re.Pattern | None, field: str):
    def fn(completion: str, tokens: int, record: dict) -> float:
        answer = extract(completion, pattern)
        return float(answer is not None and _normal(answer) == _normal(record[field]))

    return fn


def _regex(pattern: re.Pattern):
    return lambda completion, tokens, record: float(pattern.search(completion) is not None)


def _format(pattern: re.Pattern):
    return lambda completion, tokens, record: float(pattern.fullmatch(completion.strip()) is not None)


def _length_penalty(free: int, longest: int):
    span = max(1, longest - free)
    return lambda completion, tokens, record: -min(1.0, max(0, tokens - free) / span)


# --------------------------------------------------------------------------- the user's functions

def check_function_spec(spec: str, reward_paths: list[str], where: str, must_exist: bool = True) -> Path:
    """``module:function`` -> the file it will be loaded from; refused unless ``module`` is the stem
    of a file named in ``task.reward_paths`` (no file: nothing is imported). Loads nothing.
    ``must_exist=False``: the names only (a saved run's recipe is validated to generate with it,
    which needs no reward file)."""
    match = _SPEC.fullmatch(spec or "")
    if not match:
        raise TuneforgeError(f"{where}: function must be 'module:function' (e.g. my_rewards:score, with "
                             f"./my_rewards.py in task.reward_paths), got {spec!r}")
    module = match.group(1)
    files = [Path(p) for p in reward_paths]
    named = [p for p in files if p.stem == module]
    if not named:
        listed = ", ".join(str(p) for p in files) or "none"
        raise TuneforgeError(
            f"{where}: reward function '{spec}' names module '{module}', and no file {module}.py is listed in "
            f"task.reward_paths (listed: {listed}); tuneforge runs reward code only from files the recipe names "
            f"there, never from installed modules or the data — add the path of {module}.py to task.reward_paths")
    path = named[0]
    if path.suffix != ".py":
        raise TuneforgeError(f"task.reward_paths: {path} is not a .py file; name the Python file that defines {spec}")
    if must_exist and not path.is_file():
        raise TuneforgeError(f"task.reward_paths: {path} does not exist (relative paths start at the recipe's folder)")
    return path


_loaded_modules: dict[Path, Any] = {}


def load_function(spec: str, reward_paths: list[str], where: str) -> tuple[Callable, str]:
    """Import the file ``spec`` names (executing it: the user's own code) and return its function
    and a name for errors. A file is executed once per process."""
    path = check_function_spec(spec, reward_paths, where).resolve()
    module_name, function = spec.split(":")
    module = _loaded_modules.get(path)
    if module is None:
        # a private module name: the file never shadows, or is found as, an installed module
        loader_spec = importlib.util.spec_from_file_location(f"tuneforge_user_rewards.{module_name}", path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file
            raise TuneforgeError(f"{where}: importing the reward file {path} failed: {type(err).__name__}: {err}") from err
        _loaded_modules[path] = module
    fn = getattr(module, function, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise TuneforgeError(f"{where}: {path} defines no function '{function}' (its functions: "
                             f"{', '.join(found) or 'none'})")
    return fn, f"{function} in {path}"


# --------------------------------------------------------------------------- building the list

def reward_names(specs) -> list[str]:
    """The unique name of each reward (its metrics are ``reward_<name>``): ``name`` when set, else
    the function's name or the type; a second ``exact_match`` is ``exact_match_2``."""
    out: list[str] = []
    for spec in specs:
        base = spec.name or (spec.function.split(":")[-1] if spec.type == "function" and spec.function else spec.type)
        name, n = base, 2
        while name in out:
            name, n = f"{base}_{n}", n + 1
        out.append(name)
    return out


def build_rewards(specs, reward_paths: list[str], max_new_tokens: int) -> list[Reward]:
    """``task.rewards`` (objects with type, weight, name, pattern, field, function, free_tokens)
    -> :class:`Reward` objects; user functions are loaded (executed) here."""
    out: list[Reward] = []
    for i, (spec, name) in enumerate(zip(specs, reward_names(specs))):
        where = f"task.rewards[{i}] ({spec.type})"
        field = None
        if spec.type == "exact_match":
            fn, origin, field = _exact_match(_compile(spec.pattern, where), spec.field), "exact_match", spec.field
        elif spec.type in ("regex", "format"):
            pattern = _compile(spec.pattern, where)
            fn, origin = (_regex if spec.type == "regex" else _format)(pattern), f"{spec.type} {spec.pattern!r}"
        elif spec.type == "length_penalty":
            fn, origin = _length_penalty(spec.free_tokens, max_new_tokens), "length_penalty"
        else:
            user, origin = load_function(spec.function, reward_paths, where)
            fn = lambda completion, tokens, record, user=user: user(completion, record)  # noqa: E731
        out.append(Reward(name=name, weight=spec.weight, fn=fn, origin=origin, field=field))
    return out
