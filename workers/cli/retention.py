"""``enrich prune [--dry-run]`` and ``enrich dead-letters list | replay | discard``.

Both run as the maintenance role (``ENRICH_DB__ADMIN_ROLE``, ``enrich_admin``), each transaction in
the system scope: they read and write every tenant's bookkeeping.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from workers.cli.errors import CliError, one_line_errors
from workers.settings import Settings, get_settings

if TYPE_CHECKING:  # the commands import tasks modules on first use, not when the CLI starts
    from sqlalchemy.orm import Session, sessionmaker

    from tasks.maintenance.dead_letters import Resolved
    from tasks.maintenance.retention import RetentionPolicy, RetentionReport

dead_letters_app = typer.Typer(help="Messages given up on: list, replay (domain events) or discard them.",
                               no_args_is_help=True)


def retention_policy(settings: Settings, **overrides: float) -> RetentionPolicy:
    """The run policy from ``ENRICH_RETENTION__*`` (what beat passes ``catalog.prune`` too)."""
    from tasks.maintenance.retention import RetentionPolicy

    fields = settings.retention.model_dump(exclude={"enabled", "interval_s"})
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return RetentionPolicy.from_seconds(**fields)


def _factory() -> sessionmaker[Session]:
    from workers.database import get_admin_session_factory

    return get_admin_session_factory()


def _progress(report: RetentionReport) -> None:
    """A line on stderr every 50 batches of a run (a first catch-up takes thousands)."""
    if report.batches % 50 == 0:
        typer.echo(f"  ... {report.batches} batches: " + ", ".join(f"{k}={v}" for k, v in report.deleted.items()),
                   err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dead_letters_app, name="dead-letters")

    @app.command("prune")
    def prune(
        dry_run: bool = typer.Option(False, "--dry-run", help="Count what is due now; delete nothing."),
        max_run_s: float | None = typer.Option(None, min=1, help="Time budget (default ENRICH_RETENTION__MAX_RUN_S)."),
        batch_size: int | None = typer.Option(None, min=10, max=50_000, help="Rows per transaction."),
        until_caught_up: bool = typer.Option(False, "--until-caught-up",
                                             help="Repeat runs until nothing is due (a first catch-up)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """One retention run now (what beat runs every ENRICH_RETENTION__INTERVAL_S): published
        outbox rows, model result documents, finished jobs (summarised first), inbox events past
        the idempotency window, resolved dead letters, old summaries; in small batches."""
        from tasks.io.blobs import open_blob_store
        from tasks.maintenance.retention import due, run_retention
        from workers.storage import s3_client

        settings = get_settings()
        with one_line_errors():
            policy = retention_policy(settings, max_run_s=max_run_s, batch_size=batch_size)
            factory = _factory()
            if dry_run:
                counts = due(factory, policy)
                typer.echo(json.dumps(counts) if as_json else
                           "due now (nothing deleted): " + ", ".join(f"{k}={v}" for k, v in counts.items()))
                return
            blobs = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
            total: dict[str, int] = {}
            while True:
                report = run_retention(factory, blobs, policy, on_batch=None if as_json else _progress)
                for k, v in report.deleted.items():
                    total[k] = total.get(k, 0) + v
                if report.busy:
                    raise CliError("another pruner is running (its advisory lock is held); try again later")
                if report.caught_up or not until_caught_up:
                    break
        if as_json:
            typer.echo(json.dumps({"deleted": total, "caught_up": report.caught_up}))
            return
        state = "caught up" if report.caught_up else "more is due: the next run carries on"
        typer.echo("pruned " + ", ".join(f"{k}={v}" for k, v in total.items()) + f" ({state})")


@dead_letters_app.command("list")
def list_cmd(
    include_resolved: bool = typer.Option(False, "--all", help="Resolved ones too (until they are pruned)."),
    after: int = typer.Option(0, min=0, help="Only ids above this (paging)."),
    limit: int = typer.Option(50, min=1, max=1000),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Dead letters, oldest first: id, age, queue, routing key, reason, event id, resolution."""
    from dataclasses import asdict

    from tasks.maintenance.dead_letters import list_dead_letters

    with one_line_errors():
        found = list_dead_letters(_factory(), include_resolved=include_resolved, after_id=after, limit=limit)
    if as_json:
        typer.echo(json.dumps([asdict(v) for v in found], default=str, indent=2))
        return
    if not found:
        typer.echo("no dead letters" if include_resolved else "no unresolved dead letters")
    for v in found:
        state = f"{v.resolution} {v.resolved_at:%Y-%m-%d %H:%M}" if v.resolution and v.resolved_at else "unresolved"
        typer.echo(f"{v.id:>8}  {v.created_at:%Y-%m-%d %H:%M}  {v.queue}  {v.routing_key or '-'}  {v.reason}  "
                   f"event={v.event_id or '-'}  tenant={v.tenant_id or '-'}  {v.size}B  {state}"
                   + (f"\n          {v.detail[:200]}" if v.detail else ""))


def _report(results: list[Resolved], verb: str) -> None:
    failed = 0
    for r in results:
        typer.echo(f"{r.id}: {r.detail}" if r.ok else f"{r.id}: not {verb}: {r.detail}")
        failed += not r.ok
    if failed:
        raise typer.Exit(1)


@dead_letters_app.command("replay")
def replay_cmd(ids: list[int] = typer.Argument(..., help="Dead letter ids (see `enrich dead-letters list`).")) -> None:
    """Re-publish each dead letter's domain event on the events exchange and mark it replayed."""
    from tasks.maintenance.dead_letters import replay
    from workers.publisher import KombuEventPublisher

    publisher = KombuEventPublisher(get_settings())
    try:
        with one_line_errors():
            results = replay(_factory(), publisher, ids)
    finally:
        publisher.close()
    _report(results, "replayed")


@dead_letters_app.command("discard")
def discard_cmd(ids: list[int] = typer.Argument(..., help="Dead letter ids (see `enrich dead-letters list`).")) -> None:
    """Mark each dead letter discarded: it no longer counts as unresolved and is pruned later."""
    from tasks.maintenance.dead_letters import discard

    with one_line_errors():
        results = discard(_factory(), ids)
    _report(results, "discarded")
