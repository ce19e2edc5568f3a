"""The doors between the top-level folders (CONVENTIONS.md) stay shut."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "models": {"db", "celery", "kombu", "tasks", "workers", "sqlalchemy", "psycopg"},
    "db": {"torch", "transformers", "open_clip", "models", "tasks", "workers", "celery"},
    "tasks": {"workers"},
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
