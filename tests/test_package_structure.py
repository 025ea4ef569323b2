"""The package's import graph: no cycles, dependencies that run one way, modules of a readable size.

The graph is read from the source with ``ast`` (every ``import``, at module level, inside functions and under
``TYPE_CHECKING`` alike), so a lazy import inside a function cannot hide a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unlearn_hf"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``; ``from pkg import name`` points at ``pkg.name`` when that is
    a module, else at ``pkg``."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names
                ]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def imports_of(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {t for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}


def test_the_graph_reader_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "unlearn_hf.persistence" in graph["unlearn_hf.wrapper.io"]  # imported inside methods
    assert "unlearn_hf.context" in graph["unlearn_hf.methods.base"]  # `from ..context import ...`
    assert "unlearn_hf.methods.registry" in graph["unlearn_hf.methods"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        # persistence knows methods and sites, never the wrapper, the CLI or the evaluation
        ("unlearn_hf.persistence", ("unlearn_hf.wrapper", "unlearn_hf.cli", "unlearn_hf.evaluation")),
        # methods know the runtime context, hooks, sites and the probe, never what uses them
        ("unlearn_hf.methods", ("unlearn_hf.wrapper", "unlearn_hf.persistence", "unlearn_hf.cli")),
        # evaluation scores any model: it never imports the wrapper or the methods
        ("unlearn_hf.evaluation", ("unlearn_hf.wrapper", "unlearn_hf.methods", "unlearn_hf.persistence")),
        # the leaves
        ("unlearn_hf.sites", ("unlearn_hf.wrapper", "unlearn_hf.methods", "unlearn_hf.probe")),
        ("unlearn_hf.context", ("unlearn_hf.wrapper", "unlearn_hf.methods", "unlearn_hf.hooks")),
        ("unlearn_hf.model_inputs", ("unlearn_hf.",)),
        ("unlearn_hf.adapters", ("unlearn_hf.",)),
        ("unlearn_hf.stats", ("unlearn_hf.wrapper", "unlearn_hf.methods", "unlearn_hf.probe")),
    ],
)
def test_dependencies_run_one_way(layer, forbidden):
    imported = imports_of(import_graph(), layer)
    bad = sorted(
        t
        for t in imported
        if any(
            t == f or t.startswith(f.rstrip(".") + ".") or (f.endswith(".") and t.startswith(f))
            for f in forbidden
        )
    )
    assert bad == [], f"{layer} imports {bad}"


def test_no_module_is_longer_than_the_limit():
    long = {
        name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_docstrings_point_at_the_specification_in_the_repository():
    spec = PACKAGE.parent / "docs" / "METHOD.md"
    assert spec.is_file()
    sections = {
        line.split(".")[0].removeprefix("## ")
        for line in spec.read_text().splitlines()
        if line.startswith("## ")
    }
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "METHOD.md §" not in text.replace("docs/METHOD.md`` §", ""), (
            f"{path}: cite ``docs/METHOD.md`` §n"
        )
        for section in re.findall(r"docs/METHOD\.md`` §(\d+)", text):
            assert section in sections, f"{path}: no section {section} in docs/METHOD.md"
