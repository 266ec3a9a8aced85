"""The package's shape: imports go one way, from the commands down to the Redis layer.

docs/architecture.md draws the layers; this test keeps the code to the drawing. Imports
under ``TYPE_CHECKING`` are left out: they never run, so they cannot make a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "phonon_cli"

# Lower layers never import higher ones. Modules at the top of the package that are
# not named here (the public re-exports: __init__, process, update, ...) sit on top.
LAYERS: dict[str, int] = {
    "exceptions": 0,
    "defaults": 0,
    "clock": 0,
    "faults": 0,
    "logs": 0,
    "poison": 0,
    "telemetry": 0,
    "store": 1,
    "core": 2,
    "fields": 3,
    "routing": 4,
    "sinks": 4,
    "sources": 4,
    "config": 5,
    "run": 6,
    "ops": 6,
    "cli": 7,
}
TOP = max(LAYERS.values()) + 1


def module_name(path: Path) -> str:
    parts = ["phonon_cli", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) not in skipped and isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def import_graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + [node.module] if node.module else base)
                if not node.level:
                    module = node.module or ""
                targets = [
                    f"{module}.{a.name}" if f"{module}.{a.name}" in files else module
                    for a in node.names
                ]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def test_the_graph_is_read() -> None:
    """Guards the other tests: a parser that found no edges would pass them vacuously."""
    graph = import_graph()
    assert "phonon_cli.core.update" in graph["phonon_cli.core.process"]
    assert "phonon_cli.store.scripts" in graph["phonon_cli.core.reference"]


def test_imports_go_down_the_layers() -> None:
    upward = sorted(
        f"{a} imports {b}"
        for a, targets in import_graph().items()
        for b in targets
        if layer(b) > layer(a)
    )
    assert upward == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []
