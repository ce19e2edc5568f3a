"""``enrich worker | beat | publish | status | topology | demo``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from workers.cli.errors import CliError, one_line_errors


class QueueName(StrEnum):
    cpu = "cpu"
    gpu = "gpu"
    events = "events"


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        queues: str = typer.Option("cpu,gpu,events", help="Comma-separated: cpu, gpu, events."),
        device: str | None = typer.Option(None, help="Model device for the gpu queue: cpu, cuda, cuda:N (overrides ENRICH_MODELS__DEVICE)."),
        concurrency: int | None = typer.Option(None, help="Pool size. Default: 2 for cpu; ENRICH_WORKERS__BATCH_SIZE threads for gpu."),
        loglevel: str = typer.Option("INFO", help="Log level."),
        hostname: str | None = typer.Option(None, help="Celery node name (default: <queues>@<host>)."),
    ) -> None:
        """Run a worker.

        cpu: fetch+dedup, persist, outbox relay (prefork pool). gpu: model stages (thread pool: one
        model per process, micro-batched across the threads; CUDA is never initialised before
        fork). events: the domain-event intake (product events, reviews, dead letters).
        """
        from workers.worker_main import run_worker

        try:
            wanted = [QueueName(q.strip()) for q in queues.split(",") if q.strip()]
        except ValueError as exc:
            raise CliError(f"--queues: {exc}; choose from cpu, gpu, events") from exc
        if not wanted:
            raise CliError("--queues: name at least one of cpu, gpu, events")
        with one_line_errors():
            run_worker([q.value for q in wanted], device=device, concurrency=concurrency, loglevel=loglevel,
                       hostname=hostname)

    @app.command("beat")
    def beat(loglevel: str = typer.Option("INFO")) -> None:
        """Run the periodic scheduler (outbox relay, coverage reconciler, retrain)."""
        from workers.celery_app import app as celery_app

        celery_app.Beat(loglevel=loglevel, schedule=str(_beat_file())).run()

    @app.command("publish")
    def publish(
        source: Path = typer.Argument(..., exists=True, help="A folder of images (sub-folders = categories) or a manifest CSV (path,category[,split])."),
        tenant: str = typer.Option("demo", help="tenant_id of the events."),
        merchant: str = typer.Option("demo-merchant", help="merchant_id of the events."),
        limit: int = typer.Option(50, min=1, help="Most events to publish."),
        per_category: int | None = typer.Option(None, min=1, help="At most this many per category."),
    ) -> None:
        """Publish product.created events for local photos (file:// URLs) on the configured broker."""
        from workers.demo import publish_photos, select_photos

        with one_line_errors():
            photos = select_photos(source, limit=limit, per_category=per_category)
            ids = publish_photos(photos, tenant=tenant, merchant=merchant)
        typer.echo(f"published {len(ids)} product events (tenant {tenant})")

    @app.command("status")
    def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """Per-stage counts, failures by code, throughput, outbox and coverage."""
        from workers.status import collect_status, render_status

        with one_line_errors():
            report = collect_status()
        typer.echo(json.dumps(report, indent=2, default=str) if as_json else render_status(report))

    @app.command("reconcile")
    def reconcile_cmd(
        limit: int = typer.Option(1000, min=1, help="Most products re-queued in this pass."),
    ) -> None:
        """One coverage-reconciler pass now (what beat runs periodically): re-queue products whose
        latest version lacks output of the active model versions, or whose job died."""
        from db.engine import session_scope
        from tasks.pipeline.outbox import relay
        from tasks.pipeline.reconcile import reconcile
        from workers.celery_app import send_task
        from workers.database import get_admin_session_factory
        from workers.publisher import KombuEventPublisher
        from workers.settings import get_settings
        from workers.wiring import stall_thresholds

        with one_line_errors():
            factory = get_admin_session_factory()
            with session_scope(factory) as session:
                dispatches = reconcile(session, limit=limit, **stall_thresholds(get_settings()))
            publisher = KombuEventPublisher(get_settings(), send_task)
            try:
                sent = relay(factory, publisher)
            finally:
                publisher.close()
        by_stage: dict[str, int] = {}
        for d in dispatches:
            by_stage[d.stage] = by_stage.get(d.stage, 0) + 1
        typer.echo(f"re-queued {len(dispatches)} products ({json.dumps(by_stage, sort_keys=True)}); "
                   f"relayed {sent} outbox messages")

    @app.command("topology")
    def topology(definitions: bool = typer.Option(False, "--definitions", help="Print a RabbitMQ definitions file.")) -> None:
        """Show the exchanges, queues and bindings (or the RabbitMQ definitions document)."""
        from workers.broker import broker_kind, broker_url
        from workers.settings import get_settings
        from workers.topology import build_topology, rabbitmq_definitions

        settings = get_settings()
        rabbit = definitions or broker_kind(broker_url(settings)) == "rabbitmq"
        topo = build_topology(settings, rabbitmq=rabbit)
        if definitions:
            typer.echo(json.dumps(rabbitmq_definitions(topo), indent=2))
            return
        from workers.topology import queue_bindings

        for q in topo.all_queues:
            binds = ", ".join(f"{ex}:{rk}" for ex, rk in queue_bindings(q))
            typer.echo(f"{q.name:28} <- {binds}  {dict(q.queue_arguments or {})}")

    @app.command("config")
    def config(markdown: bool = typer.Option(False, "--markdown", help="Print the settings table as Markdown.")) -> None:
        """Every setting (ENRICH_*), its default and meaning; or the effective values."""
        from workers.config_doc import settings_markdown, settings_rows
        from workers.settings import get_settings

        if markdown:
            typer.echo(settings_markdown())
            return
        effective = get_settings().model_dump(mode="json")
        for name, _default, _meaning in settings_rows():
            parts = name.removeprefix("ENRICH_").lower().split("__")
            value = effective
            for p in parts:
                value = value.get(p) if isinstance(value, dict) else None
            if "url" in parts[-1] and isinstance(value, str) and "@" in value:
                value = value.split("://")[0] + "://***@" + value.rsplit("@", 1)[1]
            typer.echo(f"{name}={value if value is not None else ''}")

    @app.command("demo")
    def demo(
        source: Path | None = typer.Option(None, help="Folder or manifest CSV of photos. Default: ../shared/datasets/clothing-small."),
        limit: int = typer.Option(20, min=1, max=500, help="Number of products to enrich."),
        profile: str = typer.Option("tiny", help="Model profile: tiny (random weights, fast) or pretrained."),
        timeout: int = typer.Option(900, help="Give up waiting after this many seconds."),
    ) -> None:
        """The main job on embedded defaults: database, broker and workers started here, a sample
        of real photos published as product events, enriched end to end, and the results shown."""
        from workers.demo import run_demo

        with one_line_errors():
            ok = run_demo(source=source, limit=limit, profile=profile, timeout_s=timeout)
        raise typer.Exit(0 if ok else 1)


def _beat_file() -> Path:
    from workers.settings import get_settings

    path = get_settings().data_dir / "celerybeat-schedule"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
