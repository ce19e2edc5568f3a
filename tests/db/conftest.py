"""Fixtures of the database tests: a scratch database beside the session's, for migration runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, text

from db.engine import make_engine


@pytest.fixture
def scratch_engine(engine: Engine) -> Iterator[Callable[[str], Engine]]:
    """``scratch_engine(name)``: an engine on a new, empty database ``name`` of the test cluster,
    dropped (with its connections) when the test ends, whatever happened."""
    made: list[tuple[str, Engine]] = []

    def make(name: str) -> Engine:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        scratch = make_engine(engine.url.set(database=name).render_as_string(hide_password=False))
        made.append((name, scratch))
        return scratch

    yield make
    for name, scratch in made:
        scratch.dispose()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def models(db_session) -> dict[str, int]:  # noqa: ANN001
    """A vlm and a 512-d clip version (the catalog functions' default size) for catalog rows."""
    from tests.db.catalog_rows import add_model_version

    return {"vlm": add_model_version(db_session, "vlm", "tiny-vlm"),
            "clip": add_model_version(db_session, "clip", "tiny-clip", dims=512)}
