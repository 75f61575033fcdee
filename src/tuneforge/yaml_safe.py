"""YAML for recipes: PyYAML's SafeLoader, made strict where plain YAML loading is silently wrong.

- A key twice in one mapping (``train:`` written twice) is an error naming the key and both
  lines; PyYAML keeps the last one without a word. (Keys brought in by a ``<<: *base`` merge
  may still be overridden: that is what the merge key is for.)
- A document is composed from at most ``MAX_NODES`` nodes, and may expand, through its
  aliases, to at most ``MAX_NODES`` values (an alias bomb, nine aliases of nine aliases of ...,
  is a few hundred bytes that expand to tens of millions of items: refused before anything
  walks it). An alias that contains itself is refused too.

A recipe is a few sections of ``key: value`` pairs (hundreds of values, thousands with a long
label list), so the limit is far above any real recipe. Floor 0: it imports PyYAML and ``errors``.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .errors import TuneforgeError

MAX_NODES = 100_000  # values in a recipe, aliases expanded
_MERGE = "tag:yaml.org,2002:merge"


class RecipeYAMLError(yaml.YAMLError):
    """A recipe's YAML is well-formed but not acceptable (a duplicate key, too large); ``line`` is 1-based."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message, self.line = message, line

    def __str__(self) -> str:
        return self.message


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self.composed = 0
        self.first_alias: int | None = None  # line of the first alias, for the size message

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent) and self.first_alias is None:
            self.first_alias = self.peek_event().start_mark.line + 1
        self.composed += 1
        if self.composed > MAX_NODES:
            mark = self.peek_event().start_mark
            raise RecipeYAMLError(f"more than {MAX_NODES:,} values by line {mark.line + 1}; a recipe is a few sections "
                                  "of key: value pairs — is this the right file?", mark.line + 1)
        return super().compose_node(parent, index)

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            check_tree(node, self.first_alias)
        return node


def safe_load(text: str):
    """``yaml.safe_load`` with the checks above; raises ``yaml.YAMLError`` (``RecipeYAMLError`` for them)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_recipe_file(path: Path) -> dict:
    """A recipe file's data, every way it can be unreadable turned into an error naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise TuneforgeError(f"recipe file '{path}' does not exist (see recipes/ for examples)")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise TuneforgeError(f"{path} line {line}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}) "
                             "— re-save the recipe as UTF-8") from None
    except RecursionError:
        raise TuneforgeError(f"{path}: nested too deeply to be a recipe (a recipe is a few sections of "
                             "key: value pairs) — check the file's brackets and indentation") from None
    except OSError as err:
        raise TuneforgeError(f"cannot read recipe file {path} ({err.strerror or err}) — check its permissions") from None
    except RecipeYAMLError as err:  # a duplicate key, an alias bomb: the message says where
        raise TuneforgeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise TuneforgeError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None or data == {}:  # nothing but comments or blanks: not a recipe of defaults
        raise TuneforgeError(f"{path} is empty: a recipe names at least its data (data.train) and usually "
                             "model.name, task.type and strategy.name — see recipes/ for examples")
    return data


def _children(node) -> list:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def check_tree(root, first_alias: int | None = None) -> None:
    """Duplicate keys anywhere, the expanded size, and self-reference, in one iterative walk of
    the composed node graph (each node visited once, however many aliases point at it)."""
    size: dict[int, int] = {}   # id(node) -> values it expands to (capped just above MAX_NODES)
    active: set[int] = set()    # nodes on the current path: meeting one again is a cycle
    stack = [(root, "", False)]
    while stack:
        node, path, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            size[key] = min(MAX_NODES + 1, 1 + sum(size[id(c)] for c in _children(node)))
            if size[key] > MAX_NODES:
                where = f" (its aliases start at line {first_alias})" if first_alias else ""
                raise RecipeYAMLError(f"expands to more than {MAX_NODES:,} values through its aliases{where}; a "
                                      "recipe is a few sections of key: value pairs — write the values out, or "
                                      "alias only small blocks", first_alias)
            continue
        if key in size:
            continue
        if key in active:
            line = node.start_mark.line + 1
            raise RecipeYAMLError(f"the anchor at line {line} contains an alias of itself (at {path or 'the top'}), "
                                  "an endless value; a recipe holds plain values — remove that alias", line)
        active.add(key)
        stack.append((node, path, True))
        if isinstance(node, MappingNode):
            _check_duplicates(node, path)
            for k, v in node.value:
                name = k.value if isinstance(k, ScalarNode) else "?"
                stack.append((k, path, False))
                stack.append((v, f"{path}.{name}" if path else str(name), False))
        elif isinstance(node, SequenceNode):
            stack.extend((item, f"{path}[{i}]", False) for i, item in enumerate(node.value))


def _check_duplicates(node: MappingNode, path: str) -> None:
    seen: dict[tuple, int] = {}  # (tag, text) of a key -> the line it first appears on
    for k, _ in node.value:
        if not isinstance(k, ScalarNode) or k.tag == _MERGE:
            continue
        line = k.start_mark.line + 1
        if (k.tag, k.value) in seen:
            first = seen[(k.tag, k.value)]
            where = f"{path}.{k.value}" if path else k.value
            lines = f"lines {first} and {line}" if first != line else f"line {line} (twice)"
            raise RecipeYAMLError(f"duplicate key '{where}' at {lines}: YAML would keep only the last one, "
                                  f"silently — keep one '{k.value}:' and merge what the two hold", line)
        seen[(k.tag, k.value)] = line
