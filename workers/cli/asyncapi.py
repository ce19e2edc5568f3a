"""``enrich asyncapi``: the AsyncAPI 3.0 document of the event API, generated from the code."""

from __future__ import annotations

from pathlib import Path

import typer

from workers.cli.errors import CliError


def register(app: typer.Typer) -> None:
    @app.command("asyncapi")
    def asyncapi(
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the document here (default: stdout)."),
    ) -> None:
        """Print (or write) the AsyncAPI 3.0 document: channels per routing key and queue, operations,
        messages with the JSON Schemas of tasks/contracts as payloads, AMQP bindings. The committed
        copy is infra/asyncapi.yaml."""
        from workers.asyncapi import AsyncApiError, build_document, render_yaml
        from workers.settings import get_settings

        try:
            text = render_yaml(build_document(get_settings()))
        except AsyncApiError as exc:
            raise CliError(str(exc)) from exc
        if output is None:
            typer.echo(text, nl=False)
            return
        output.write_text(text)
        typer.echo(f"wrote {output}")
