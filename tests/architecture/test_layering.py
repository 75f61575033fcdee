"""The package's floors (docs/architecture.md), checked by reading every import with ``ast``.

    face      tuneforge/__init__.py, __main__.py, cli.py      may import anything
    schema    recipe.py                                      floors 0-1 (the recipe language)
    floor 3   deploy/, workflows/, service/                  floors 0-2 and the schema
    floor 2   run/                                           floors 0-1 and the schema
    floor 1   data, models, modalities, llm, tasks,          floors 0-1
              strategies, engine, speed, evaluation
    floor 0   errors.py, schema.py, _compat.py, yaml_safe.py floor 0 only

Every import counts, also those inside functions (lazy imports are still dependencies).
Besides the direction, the graph of units (a floor-1 package, ``run``, ``recipe``, ...) must
have no cycle, and no two modules may import each other at import time. The deprecated
top-level shims (``tuneforge/pipeline.py`` and the others listed in CHANGELOG.md) forward by
name at run time and import nothing but ``_compat``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tuneforge"
FLOOR = {"face": 4, "floor3": 3, "floor2": 2, "schema": 1.5, "floor1": 1, "floor0": 0}
UNITS = {
    "tuneforge": "face", "__main__": "face", "cli": "face",
    "recipe": "schema",
    "deploy": "floor3", "workflows": "floor3", "service": "floor3",
    "run": "floor2",
    "data": "floor1", "models": "floor1", "modalities": "floor1", "llm": "floor1", "tasks": "floor1",
    "strategies": "floor1", "engine": "floor1", "speed": "floor1", "evaluation": "floor1",
    "errors": "floor0", "schema": "floor0", "_compat": "floor0", "yaml_safe": "floor0",
}
SHIMS = {"pipeline", "saving", "resume", "provenance", "predict", "serve", "evaluate", "export", "compare", "cv",
         "reproduce", "demo"}


def module_name(path: Path) -> str:
    parts = ["tuneforge", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tuneforge":
        return None
    return "tuneforge" if len(parts) == 1 else parts[1]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported tuneforge module, line, at import time) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("tuneforge"):
                out.append((name, node.lineno, id(node) in top_level))
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The module a dotted import name refers to (``pkg.mod.Class`` -> ``pkg.mod``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph():
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for module, path in files.items():
        edges[module] = []
        for name, line, eager in imports(path):
            target = _resolve(name, set(files))
            if target and target != module and (target, line, eager) not in edges[module]:
                edges[module].append((target, line, eager))
    return files, edges


def test_every_module_belongs_to_a_floor():
    files, _ = graph()
    loose = sorted(m for m in files if unit_of(m) not in UNITS and unit_of(m) not in SHIMS)
    assert not loose, f"modules outside every floor (add them to UNITS and docs/architecture.md): {loose}"


def test_imports_only_go_down():
    files, edges = graph()
    wrong = []
    for module, targets in edges.items():
        unit = unit_of(module)
        if unit in SHIMS:
            assert {unit_of(t) for t, _, _ in targets} <= {"_compat"}, f"{module} is a shim: it imports only _compat"
            continue
        for target, line, _ in targets:
            t_unit = unit_of(target)
            if t_unit in SHIMS:
                wrong.append(f"{files[module].relative_to(SRC)}:{line} imports the deprecated {target}")
            elif FLOOR[UNITS[t_unit]] > FLOOR[UNITS[unit]]:  # same floor: allowed, circles are caught below
                wrong.append(f"{files[module].relative_to(SRC)}:{line} ({UNITS[unit]}) imports {target} "
                             f"({UNITS[t_unit]})")
    assert not wrong, "imports that go up a floor:\n  " + "\n  ".join(wrong)


def _cycle(nodes, succ):
    """One cycle of the directed graph, as a list of nodes, or None (iterative DFS)."""
    colour, parent = {}, {}
    for start in nodes:
        if start in colour:
            continue
        stack = [(start, iter(succ.get(start, ())))]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
            elif colour.get(nxt) == 1:
                path = [node]
                while path[-1] != nxt:
                    path.append(parent[path[-1]])
                return list(reversed(path)) + [nxt]
            elif nxt not in colour:
                colour[nxt], parent[nxt] = 1, node
                stack.append((nxt, iter(succ.get(nxt, ()))))
    return None


def test_no_cycle_between_units():
    _, edges = graph()
    succ: dict[str, set] = {}
    for module, targets in edges.items():
        for target, _, _ in targets:
            a, b = unit_of(module), unit_of(target)
            if a != b and a not in SHIMS and a != "tuneforge":
                succ.setdefault(a, set()).add(b)
    cycle = _cycle(sorted(succ), {k: sorted(v) for k, v in succ.items()})
    assert cycle is None, "units import each other in a circle: " + " -> ".join(cycle)


def test_no_import_time_cycle_between_modules():
    _, edges = graph()
    succ = {m: sorted({t for t, _, eager in ts if eager}) for m, ts in edges.items()}
    cycle = _cycle(sorted(succ), succ)
    assert cycle is None, "modules import each other at import time: " + " -> ".join(cycle)


@pytest.mark.parametrize("source,expected", [
    ("from ..run.artifact import load_model_dir\n", "tuneforge.run.artifact.load_model_dir"),
    ("import tuneforge.deploy.serve\n", "tuneforge.deploy.serve"),
])
def test_the_checker_sees_lazy_and_absolute_imports(tmp_path, source, expected):
    """The checker itself: an import inside a function is found and resolved."""
    pkg = SRC / "engine"
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    " + source)
    tree_imports = [name for name, _, _ in imports_at(path, pkg / "probe.py")]
    assert expected in tree_imports


def imports_at(path: Path, pretend: Path):
    """``imports`` of ``path`` as if it were the file ``pretend`` inside the package."""
    original = path.read_text()
    tree = ast.parse(original)
    module = module_name(pretend)
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            out += [(f"{target}.{a.name}", node.lineno, False) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, False) for a in node.names]
    return out
