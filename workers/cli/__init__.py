"""The ``enrich`` command. Each command group lives in its own module and registers here."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from workers.cli import db as db_cmds
from workers.cli import doctor as doctor_cmds
from workers.cli.errors import CliError

app = typer.Typer(
    help="Catalog enrichment workers: product events in, enriched listings and vectors out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(db_cmds.app, name="db")


@app.callback()
def _configure() -> None:
    from workers.logs import configure_logging
    from workers.settings import get_settings

    settings = get_settings()
    configure_logging(json=settings.is_production, level=settings.log_level)

doctor_cmds.register(app)


def _register_optional() -> None:
    """Command groups owned by later modules; each registers its own commands."""
    import importlib

    for module in ("workers.cli.pipeline", "workers.cli.embeddings", "workers.cli.retrain",
                   "workers.cli.retention", "workers.cli.asyncapi", "workers.cli.report",
                   "workers.cli.images"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_optional()


def main() -> None:
    try:
        app()
    except CliError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "__".join(str(p) for p in first["loc"]).upper()
        where = f"ENRICH_{loc}" if loc else "settings"
        typer.secho(f"error: invalid configuration {where}: {first['msg']}", fg="red", err=True)
        sys.exit(2)
