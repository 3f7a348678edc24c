"""The architecture as a test: imports go one way between packages, and no module cycle exists.

Reads every module's imports with ``ast`` (function-level imports included: a cycle hidden inside
a function is still a cycle; ``if TYPE_CHECKING:`` blocks are left out, they never run).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("auth", "streaming", "kernels", "widgets", "hub", "bench")

#: package -> the packages it may import (besides itself). DESIGN: hub -> widgets -> streaming,
#: hub -> kernels; kernels and streaming import nothing of each other; auth is the bottom layer.
ALLOWED = {
    "auth": set(),
    "streaming": {"auth"},
    "kernels": {"auth"},
    "widgets": {"streaming", "auth"},
    "hub": {"widgets", "streaming", "kernels", "auth"},
    "bench": {"hub", "widgets", "streaming", "kernels", "auth"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "beamhub." + ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = _modules()


class _Imports(ast.NodeVisitor):
    """Imported module names, skipping ``if TYPE_CHECKING:`` blocks."""

    def __init__(self) -> None:
        self.names: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names += [(node.lineno, alias.name) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            self.names.append((node.lineno, "<relative>"))
            return
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            self.names.append((node.lineno, full if full in MODULES else node.module))


def _imports(path: Path) -> list[tuple[int, str]]:
    visitor = _Imports()
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.names


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph[module] = {name for _, name in _imports(path) if name in MODULES} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_found() -> None:
    assert "beamhub.auth.tokens" in MODULES and "beamhub.hub.cli" in MODULES
    assert len(MODULES) > 80


def test_imports_go_down_the_layers() -> None:
    wrong = []
    for module, path in MODULES.items():
        pkg = module.split(".")[1]
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] in PACKAGES or name == "<relative>":
                wrong.append(f"{path.relative_to(ROOT)}:{line}: import {name} (use beamhub.*)")
            elif parts[0] == "beamhub" and len(parts) > 1:
                target = parts[1]
                if target != pkg and target not in ALLOWED[pkg]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {pkg} imports {name}")
    assert not wrong, "upward or unprefixed imports:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (mend by moving code):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


@pytest.mark.parametrize("folder", ["tests", "notebooks"])
def test_tests_and_notebooks_import_the_namespace(folder: str) -> None:
    """`import hub` works from the checkout by accident; only `beamhub.hub` works installed."""
    wrong = []
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix == ".py":
            sources = [path.read_text()]
        elif path.suffix == ".ipynb":
            cells = json.loads(path.read_text())["cells"]
            sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        else:
            continue
        for source in sources:
            for node in ast.walk(ast.parse(source)):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                wrong += [
                    f"{path.relative_to(ROOT)}: import {n}"
                    for n in names
                    if n.split(".")[0] in PACKAGES
                ]
    assert not wrong, "\n".join(wrong)
