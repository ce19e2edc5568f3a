"""Alembic environment: runs on a connection handed over by db.migrate, or on sqlalchemy.url."""

from alembic import context
from sqlalchemy import create_engine, pool

import db.tables  # noqa: F401  (registers every table on the metadata)
from db.base import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run_on(conn)


def _run_on(connection) -> None:  # noqa: ANN001
    context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                      transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


run()
