"""Unit test: the project's modules import each other without a circle (lazy imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "ops", "replica", "loadgen")


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # from common import cli
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif node.module.split(".")[0] in PACKAGES:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            graph[name] = project_imports(path) - {name}
    return graph


def test_no_import_circle():
    graph = import_graph()
    circles = []

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph.get(name, ())):
            if dep in path:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep in graph:
                visit(dep, path + [dep])

    for name in graph:
        visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


# Floors, lowest first: a module imports its own floor and those below, never one above.
# replica/ runs inside replicas (it ships alone), common/ is the scripts' code, ops/ the
# operator tools' own; loadgen/ stands apart (load_test.py and the benchmarks use it).
FLOORS = {"replica": 0, "loadgen": 0, "common": 1, "ops": 2}


def test_no_upward_import():
    upward = sorted(f"{name} -> {dep}" for name, deps in import_graph().items() for dep in deps
                    if FLOORS[dep.split(".")[0]] > FLOORS[name.split(".")[0]]
                    or (FLOORS[dep.split(".")[0]] == FLOORS[name.split(".")[0]]
                        and dep.split(".")[0] != name.split(".")[0]))
    assert not upward, "imports from a floor above (or beside):\n" + "\n".join(upward)
