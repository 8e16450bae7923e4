"""The shape of the package: no import cycles, modules readable in one go, each saying what it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lbapp"
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_LINES = 300


def imports_of(path: Path) -> set[str]:
    """lbapp modules `path` imports, at any depth of the file (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("lbapp."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lbapp."))
    return found & {m.stem for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the import graph, as the list of modules along it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            cycle = visit(imported, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycles() -> None:
    graph = {m.stem: imports_of(m) - {m.stem} for m in MODULES if m.stem != "__init__"}
    graph = {name: deps - {"__init__"} for name, deps in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_short_and_opens_with_a_docstring(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"
