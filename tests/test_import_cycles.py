"""No import cycles: between medseg's packages, and between the modules of one package.

Every module is parsed (not imported), so imports inside functions and under ``TYPE_CHECKING`` count
too: a lazy import hides a cycle from Python, not from a reader. Two graphs are checked:

* packages: ``medseg.batch``, ``medseg.export``, ... and the top-level modules (``medseg.pipeline``);
  an edge wherever a module of one imports from the other;
* modules within each package: ``medseg.training.loop`` -> ``medseg.training.distributed``, ...
  (a package's ``__init__`` re-exporting its modules is not an edge back from them).

A cycle is reported with the import lines that close it. ``ALLOWED`` would name accepted cycles; it is
empty and must stay so.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "medseg"
ALLOWED: frozenset[frozenset[str]] = frozenset()  # accepted cycles, as sets of nodes: none

Edges = dict[str, dict[str, list[str]]]  # node -> imported node -> ["path:line", ...]


def _module_name(path: Path) -> str:
    parts = ["medseg", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The medseg modules ``name`` imports (``from pkg import mod`` resolves to the module), with lines."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    result = []
    for target, line in found:
        while target and target not in known:  # `import medseg.x.y.z` where z is a name: its module
            target = target.rpartition(".")[0]
        if target.startswith("medseg") and target != name:
            result.append((target, line))
    return result


def _graphs() -> tuple[Edges, Edges]:
    modules = _modules()
    known = set(modules)
    packages: Edges = defaultdict(lambda: defaultdict(list))
    within: Edges = defaultdict(lambda: defaultdict(list))
    for name, path in modules.items():
        where = str(path.relative_to(ROOT.parent))
        for target, line in _imports(name, path, known):
            src, dst = _package(name), _package(target)
            if src != dst:
                packages[src][dst].append(f"{where}:{line}")
            elif _is_package(target, modules) is False and _is_package(name, modules) is False:
                within[name][target].append(f"{where}:{line}")
    return packages, within


def _package(module: str) -> str:
    """``medseg.batch.job`` -> ``medseg.batch``; ``medseg.pipeline`` -> itself."""
    return ".".join(module.split(".")[:2])


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def _describe(cycle: list[str], edges: Edges) -> str:
    members = set(cycle)
    lines = [" <-> ".join(cycle) + ":"]
    for src in cycle:
        for dst, where in sorted(edges.get(src, {}).items()):
            if dst in members:
                where = list(dict.fromkeys(where))
                more = " ..." if len(where) > 4 else ""
                lines.append(f"    {src} -> {dst} at {', '.join(where[:4])}{more}")
    return "\n".join(lines)


@pytest.mark.parametrize("level", ["packages", "modules within a package"])
def test_no_import_cycles(level: str) -> None:
    packages, within = _graphs()
    edges = packages if level == "packages" else within
    cycles = [c for c in _cycles(edges) if frozenset(c) not in ALLOWED]
    report = "\n".join(_describe(c, edges) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) between {level}:\n{report}"


def test_the_walker_sees_every_kind_of_import() -> None:
    """The parser finds module-level, function-level, relative and TYPE_CHECKING imports."""
    packages, within = _graphs()
    assert "medseg.errors" in packages["medseg.commands"]  # only imported inside functions there
    assert packages["medseg.commands"]["medseg.batch"]  # `from medseg.batch.runner import ...` in a function
    assert not any(src == dst for src, targets in packages.items() for dst in targets)
    assert all(_package(src) == _package(dst) for src, targets in within.items() for dst in targets)


def test_a_cycle_is_found_and_described() -> None:
    edges: Edges = {
        "medseg.a": {"medseg.b": ["medseg/a.py:3"]},
        "medseg.b": {"medseg.c": ["medseg/b.py:9"]},
        "medseg.c": {"medseg.a": ["medseg/c.py:1"], "medseg.d": ["medseg/c.py:2"]},
    }
    assert _cycles(edges) == [["medseg.a", "medseg.b", "medseg.c"]]
    text = _describe(["medseg.a", "medseg.b", "medseg.c"], edges)
    assert "medseg.c -> medseg.a at medseg/c.py:1" in text
    assert "medseg.d" not in text
