"""The task layer builds no SQL: its queries are named functions in ``db/repositories/``
(CONVENTIONS.md: SQL lives behind named repository functions, not inline in task modules)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tasks"

SQL_BUILDERS = {"select", "insert", "text", "update", "delete"}
SESSION_NAMES = {"session", "s"}
SESSION_QUERIES = {"execute", "scalar", "scalars", "get"}


def sql_calls(source: str, filename: str = "<source>") -> list[str]:
    """``line: call`` for every SQL statement built or run in ``source``."""
    tree = ast.parse(source, filename=filename)
    builders: set[str] = set()  # local names bound to sqlalchemy's statement constructors
    modules: set[str] = set()  # local names bound to sqlalchemy (sub)modules
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.level == 0
                and (node.module or "").split(".")[0] == "sqlalchemy"):
            builders.update(a.asname or a.name for a in node.names if a.name in SQL_BUILDERS)
            modules.update(a.asname or a.name for a in node.names if a.name not in SQL_BUILDERS)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names
                           if a.name.split(".")[0] == "sqlalchemy")
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in builders:
            found.append(f"{node.lineno}: {func.id}(")
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id in SESSION_NAMES and func.attr in SESSION_QUERIES:
                found.append(f"{node.lineno}: {func.value.id}.{func.attr}(")
            elif func.value.id in modules and func.attr in SQL_BUILDERS:
                found.append(f"{node.lineno}: {func.value.id}.{func.attr}(")
    return sorted(found, key=lambda call: int(call.split(":")[0]))


def test_the_task_layer_builds_no_sql() -> None:
    files = sorted(TASKS.rglob("*.py"))
    assert len(files) > 10, "tasks/ has too few Python files: is the path right?"
    offenders = [f"{f.relative_to(ROOT)}:{call}" for f in files for call in sql_calls(f.read_text(), str(f))]
    assert not offenders, "SQL outside db/repositories/:\n" + "\n".join(offenders)


def test_checker_finds_built_and_run_statements() -> None:
    source = (
        "import sqlalchemy as sa\n"
        "from sqlalchemy import select, text as sql\n"
        "from sqlalchemy.dialects.postgresql import insert\n"
        "def f(session, s, rows):\n"
        "    session.execute(sql('SELECT 1'))\n"
        "    s.scalar(select(1))\n"
        "    session.scalars(sa.delete(rows))\n"
        "    s.get(rows, 1)\n"
        "    insert(rows)\n"
        "    rows.get('id')\n"  # a dict's get is no query
        "    session.add(rows)\n"
    )
    calls = {c.split(": ")[1] for c in sql_calls(source)}
    assert calls == {"session.execute(", "sql(", "s.scalar(", "select(", "session.scalars(", "sa.delete(",
                     "s.get(", "insert("}
