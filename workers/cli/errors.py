from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from db.engine import DatabaseUnavailable


class CliError(Exception):
    """Printed as one line (no traceback) and exit status 2."""


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn expected operational failures into CliError."""
    try:
        yield
    except DatabaseUnavailable as exc:
        raise CliError(str(exc)) from exc
