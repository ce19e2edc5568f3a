"""``enrich images backfill-hashes [--dry-run] [--batch-size N] [--limit N] [--json]``.

A maintenance command: it runs as the maintenance role (``ENRICH_DB__ADMIN_ROLE``, ``enrich_admin``),
each transaction in the system scope, and reads the originals from ``ENRICH_STORAGE__ORIGINALS_URI``
(``tasks.maintenance.image_hashes``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import typer

from workers.cli.errors import CliError, one_line_errors
from workers.settings import get_settings

if TYPE_CHECKING:
    from tasks.maintenance.image_hashes import HashBackfillReport

images_app = typer.Typer(help="Stored images: maintenance of what candidate search compares.",
                         no_args_is_help=True)


def _progress(report: HashBackfillReport) -> None:
    typer.echo(f"  ... {report.looked_at}/{report.todo} rows: filled {report.filled}, "
               f"not filled {len(report.unfilled)} (up to image id {report.last_id})", err=True)


@images_app.command("backfill-hashes")
def backfill_hashes(
    dry_run: bool = typer.Option(False, "--dry-run", help="Count the rows lacking hashes; change nothing."),
    batch_size: int = typer.Option(100, min=1, max=5000, help="Rows per transaction."),
    limit: int = typer.Option(0, min=0, help="Stop after this many rows (0 = all); run again to go on."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Fill the trimmed and centre hashes of images stored before migration 0009 (candidate search
    compares letterboxed and background-changed copies by them), from the stored originals.
    Idempotent and resumable; images whose original is gone are listed, and the exit status is 1."""
    from models.images import ImageLimits
    from tasks.errors import PipelineError
    from tasks.io.blobs import open_blob_store
    from tasks.maintenance.image_hashes import backfill_image_hashes, count_todo
    from workers.database import get_admin_session_factory
    from workers.storage import s3_client

    settings = get_settings()
    with one_line_errors():
        factory = get_admin_session_factory()
        if dry_run:
            todo = count_todo(factory)
            typer.echo(json.dumps({"todo": todo}) if as_json else f"{todo} images lack trimmed/centre hashes")
            return
        blobs = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
        limits = ImageLimits(max_pixels=settings.storage.max_pixels, max_frames=settings.storage.max_frames)
        try:
            report = backfill_image_hashes(factory, blobs.get, limits, batch_size=batch_size,
                                           limit=limit or None, on_batch=None if as_json else _progress)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        except PipelineError as exc:  # a storage outage: what was filled stays filled
            raise CliError(f"{exc}; run the command again to go on") from exc
    if as_json:
        typer.echo(json.dumps({"todo": report.todo, "filled": report.filled, "already": report.already,
                               "unfilled": [asdict(u) for u in report.unfilled], "batches": report.batches,
                               "seconds": round(report.seconds, 3)}))
    else:
        typer.echo(f"filled the hashes of {report.filled} of {report.todo} images in {report.batches} "
                   f"batches ({report.seconds:.1f}s); {report.already} already complete; "
                   f"{len(report.unfilled)} not filled")
        for u in report.unfilled:
            typer.echo(f"  image {u.image_id} (tenant {u.tenant_id}): {u.reason}: {u.detail} "
                       f"[{u.storage_uri}]")
    if report.unfilled:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(images_app, name="images")
