"""The package's modules import each other without a cycle, and without hiding an import
behind ``importlib`` (which would also hide it from mypy)."""

from __future__ import annotations

import ast
from pathlib import Path

import teg_gateway

PACKAGE = Path(teg_gateway.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (anywhere in it)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[module_name(path)] = names
    return {name: {n for n in names if n in found and n != name}
            for name, names in found.items()}


def test_no_module_imports_itself_through_others() -> None:
    graph = imports()
    assert "teg_gateway.controller.factory" in graph
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_no_package_module_is_imported_by_name_at_run_time() -> None:
    hidden = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
              if 'import_module("teg_gateway' in path.read_text()
              or "import_module('teg_gateway" in path.read_text()]
    assert hidden == []
