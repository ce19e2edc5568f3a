"""The doors between the top-level folders (CONVENTIONS.md) stay shut."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "models": {"db", "celery", "kombu", "tasks", "workers", "sqlalchemy", "psycopg"},
    "db": {"torch", "transformers", "open_clip", "models", "tasks", "workers", "celery"},
    "tasks": {"workers", "torch", "transformers", "xgrammar", "open_clip"},
    "migrations": {"torch", "transformers", "open_clip", "models", "tasks", "workers", "celery"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    crossings = [
        f"{f.relative_to(ROOT)} imports {sorted(imported_roots(f) & FORBIDDEN[package])}"
        for f in files
        if imported_roots(f) & FORBIDDEN[package]
    ]
    assert not crossings, "forbidden imports:\n" + "\n".join(crossings)


def test_checker_detects_a_crossing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom workers.settings import Settings\n")
    assert {"torch", "workers"} <= imported_roots(bad)


def test_only_settings_reads_the_environment() -> None:
    readers = []
    for package in ("workers", "tasks", "db", "models"):
        for f in (ROOT / package).rglob("*.py"):
            text = f.read_text()
            if ("os.environ" in text or "os.getenv" in text) and f.name != "settings.py":
                readers.append(str(f.relative_to(ROOT)))
    assert not readers, f"environment read outside workers/settings.py: {readers}"


ML_STACK = {"torch", "transformers", "xgrammar", "open_clip", "peft", "trl"}


def module_level_roots(path: Path) -> set[str]:
    """Roots imported when the module itself is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_workers_import_the_ml_stack_only_where_it_is_used() -> None:
    """workers/ may load torch lazily (the model bundle of a GPU worker, doctor), never at import."""
    crossings = [f"{f.relative_to(ROOT)} imports {sorted(module_level_roots(f) & ML_STACK)}"
                 for f in sorted((ROOT / "workers").rglob("*.py")) if module_level_roots(f) & ML_STACK]
    assert not crossings, "module-level ML imports in workers/:\n" + "\n".join(crossings)


PACKAGES = ("tasks", "workers", "db", "models")


def import_graph() -> dict[str, set[str]]:
    """Module → first-party modules it imports, at any level (function-level imports count: they
    run too), leaving out ``if TYPE_CHECKING:`` blocks."""
    files = {".".join(f.with_suffix("").parts[len(ROOT.parts):]).removesuffix(".__init__"): f
             for package in PACKAGES for f in (ROOT / package).rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                deps.update(r for a in node.names if (r := resolve(a.name)))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.update(r for a in node.names if (r := resolve(f"{node.module}.{a.name}") or resolve(node.module)))
        graph[module] = {d for d in deps if d != module and files[d].name != "__init__.py"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
