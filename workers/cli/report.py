"""``enrich report``: a static HTML page of the enriched products (photos with their grounding box,
crop, attributes kept and dropped, duplicates, nearest products) and a summary.

A maintenance command: it reads as the maintenance role (``ENRICH_DB__ADMIN_ROLE``,
``enrich_admin``) in the system scope, so one tenant's report or every tenant's comes from the
same login; the originals are read from ``ENRICH_STORAGE__ORIGINALS_URI``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from workers.cli.errors import one_line_errors


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        tenant: str | None = typer.Option(None, help="Only this tenant's products (default: every tenant)."),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Where to write the page (default: <data dir>/reports/report-<tenant>.html)."),
        limit: int = typer.Option(200, min=1, max=5000, help="Most products on the page (by tenant, external id)."),
        neighbours: int = typer.Option(5, min=0, max=50, help="Nearest products shown per product (0: none)."),
    ) -> None:
        """Write one self-contained HTML page (images embedded as downscaled data URIs) showing what
        the models did to each enriched product, and print its path."""
        from workers.report import report_from_settings
        from workers.settings import get_settings

        with one_line_errors():
            result = report_from_settings(get_settings(), output, tenant=tenant, limit=limit, neighbours=neighbours)
        more = f" (first {result.products} of {result.listed})" if result.listed > result.products else ""
        missing = f"; {result.unreadable} originals unreadable (placeholders)" if result.unreadable else ""
        typer.echo(f"report of {result.products} products{more}, {result.bytes / 1024:.0f} KiB{missing}")
        typer.echo(str(result.path.resolve()))
