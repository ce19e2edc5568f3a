"""Postgres/pgvector: tables, engine and session scope, repositories, SQL helpers. Never imports torch."""
