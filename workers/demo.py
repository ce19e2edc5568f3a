"""The main job on embedded defaults (``enrich demo``), and photo publishing (``enrich publish``)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select, text

from workers.cli.errors import CliError
from workers.logs import get_logger
from workers.settings import export_overrides, get_settings

log = get_logger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(frozen=True)
class Photo:
    path: Path
    category: str


def default_source() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "clothing-small"


def select_photos(source: Path, *, limit: int, per_category: int | None = None) -> list[Photo]:
    """Photos from a folder (sub-folder names are categories) or a CSV with path,category columns.
    Picks round-robin across categories so a small sample still covers all of them."""
    source = source.expanduser().resolve()
    if source.is_dir() and (source / "manifest.csv").exists():
        source = source / "manifest.csv"
    by_cat: dict[str, list[Path]] = {}
    if source.is_file():
        with open(source, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "category"} <= set(reader.fieldnames):
                raise CliError(f"{source}: a CSV needs 'path' and 'category' columns")
            for row in reader:
                if row.get("split", "validation") in ("validation", "val", "test", ""):
                    by_cat.setdefault(row["category"], []).append((source.parent / row["path"]).resolve())
    elif source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                by_cat.setdefault(p.parent.name, []).append(p)
    if not by_cat:
        raise CliError(f"{source}: no photos found (expected image files in category folders or a manifest CSV)")
    picked: list[Photo] = []
    cap = per_category or limit
    depth = 0
    while len(picked) < limit and depth < cap:
        added = False
        for cat in sorted(by_cat):
            if depth < len(by_cat[cat]) and len(picked) < limit:
                picked.append(Photo(by_cat[cat][depth], cat))
                added = True
        if not added:
            break
        depth += 1
    return picked


def publish_photos(photos: list[Photo], *, tenant: str, merchant: str, version: int | None = None,
                   external_ids: list[str] | None = None, titled_as: list[str] | None = None) -> list[uuid.UUID]:
    """``titled_as``: the SKU whose title each event repeats (a re-listing repeats the original's
    text, so it is a true re-listing and reuses its listing)."""
    from workers.publisher import KombuEventPublisher
    from tasks.events import product_event_payload

    publisher = KombuEventPublisher(get_settings())
    version = version if version is not None else int(time.time())
    ids: list[uuid.UUID] = []
    try:
        for n, photo in enumerate(photos):
            ext = external_ids[n] if external_ids else photo.path.stem
            named = titled_as[n] if titled_as else ext
            payload = product_event_payload(
                tenant_id=tenant, merchant_id=merchant, external_id=ext, version=version, category=photo.category,
                image_urls=[photo.path.as_uri()], title=f"{photo.category} {named[:8]}",
                description="Merchant photo from the sample catalogue.", attributes={"brand": "Sample Co"})
            publisher.publish("product.created", payload, message_id=payload["event_id"])
            ids.append(uuid.UUID(payload["event_id"]))
    finally:
        publisher.close()
    return ids


def _near_copy(photo: Photo, out_dir: Path) -> Photo:
    """A re-encoded, slightly cropped copy: a near-duplicate the dedup stage should catch."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(photo.path) as im:
        w, h = im.size
        copy = im.convert("RGB").crop((int(w * 0.04), int(h * 0.04), w, h))
        buf = io.BytesIO()
        copy.save(buf, "JPEG", quality=40)
    target = out_dir / f"{photo.path.stem}-reupload.jpg"
    target.write_bytes(buf.getvalue())
    return Photo(target, photo.category)


def _skus(photos: list[Photo]) -> list[str]:
    """Readable, stable product ids (dress-1, dress-2, hat-1, …) so SQL examples can name them."""
    seen: dict[str, int] = {}
    out = []
    for photo in photos:
        seen[photo.category] = seen.get(photo.category, 0) + 1
        out.append(f"{photo.category}-{seen[photo.category]}")
    return out


def _start_workers(log_dir: Path) -> list[subprocess.Popen[bytes]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for queues in ("events,cpu", "gpu"):
        logf = open(log_dir / f"worker-{queues.replace(',', '-')}.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, "-m", "workers", "worker", "--queues", queues,
                                       "--loglevel", "WARNING"], stdout=logf, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_demo(*, source: Path | None, limit: int, profile: str, timeout_s: int) -> bool:
    console = Console()
    source = (source or default_source()).expanduser().resolve()
    settings = get_settings()
    roots = [str(source if source.is_dir() else source.parent), str(settings.data_dir / "demo-variants")]
    export_overrides(ENRICH_MODELS__PROFILE=profile, ENRICH_STORAGE__ALLOW_FILE_URLS="true",
                     ENRICH_STORAGE__FILE_ROOTS=json.dumps(roots))
    settings = get_settings()
    if not source.exists():
        raise CliError(f"photo source {source} not found; pass --source FOLDER_OR_CSV")

    from db import migrate
    from db.engine import check_database
    from workers.database import database_url, get_engine

    url = database_url(settings)  # starts the embedded server when no URL is configured
    engine = get_engine(settings)
    check_database(engine)
    migrate.upgrade(engine)
    where = "embedded PostgreSQL+pgvector" if not settings.db.url else "ENRICH_DB__URL"
    broker = "embedded SQLite broker" if not settings.broker.url else "ENRICH_BROKER__URL"
    console.print(f"[bold]database[/]: {where} ({engine.url.render_as_string(hide_password=True)})")
    console.print(f"[bold]broker[/]: {broker}   [bold]models[/]: {profile} profile   [bold]data[/]: {settings.data_dir}")
    if profile != "pretrained":
        console.print(Panel("RANDOM WEIGHTS: the models run with random initialisation (no pretrained weights are "
                            "available here). Titles, attributes and similarities below exercise the full pipeline "
                            "but are NOT meaningful.", style="bold yellow"))

    photos = select_photos(source, limit=max(1, limit - 2))
    extra = [photos[0], _near_copy(photos[min(1, len(photos) - 1)], settings.data_dir / "demo-variants")]
    from workers.broker import broker_kind, broker_url
    from workers.topology import build_topology
    from workers.worker_main import declare_everything

    declare_everything(build_topology(settings, rabbitmq=broker_kind(broker_url(settings)) == "rabbitmq"))
    procs = _start_workers(settings.data_dir / "logs")
    try:
        time.sleep(2.0)
        version = int(time.time())
        skus = _skus(photos)
        ids = publish_photos(photos, tenant="demo", merchant="demo-merchant", version=version, external_ids=skus)
        ids += publish_photos(extra, tenant="demo", merchant="demo-merchant", version=version,
                              external_ids=[f"{skus[0]}-relisted", f"{skus[min(1, len(skus) - 1)]}-reupload"],
                              titled_as=[skus[0], skus[min(1, len(skus) - 1)]])
        done = _wait(console, engine, ids, timeout_s, procs)
    finally:
        _stop_workers(procs)
    _show_results(console, engine, ids)
    _write_report(console)
    return done


def _write_report(console: Console) -> None:
    """The demo tenant's ``enrich report`` page, beside the table."""
    from workers.report import report_from_settings

    try:
        result = report_from_settings(get_settings(), None, tenant="demo")
    except CliError as exc:
        console.print(f"[yellow]report not written: {exc}[/]")
        return
    console.print(f"\n[bold]report[/] ({result.products} products, {result.bytes / 1024:.0f} KiB; open it in a "
                  f"browser): {result.path.resolve()}", soft_wrap=True, markup=True, highlight=False)


def _wait(console: Console, engine, ids: list[uuid.UUID], timeout_s: int, procs) -> bool:  # noqa: ANN001
    from db.tables import EnrichmentJob, InboxEvent

    deadline = time.monotonic() + timeout_s
    with Progress(TextColumn("enriching"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[detail]}"), console=console) as progress:
        bar = progress.add_task("enrich", total=len(ids), detail="")
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                finished = conn.execute(select(func.count()).select_from(EnrichmentJob).where(
                    EnrichmentJob.event_id.in_(ids), EnrichmentJob.status.in_(["done", "failed", "superseded"]))).scalar_one()
                rejected = conn.execute(select(func.count()).select_from(InboxEvent).where(
                    InboxEvent.event_id.in_(ids), InboxEvent.status != "accepted")).scalar_one()
            progress.update(bar, completed=finished + rejected, detail=f"{finished + rejected}/{len(ids)} finished")
            if finished + rejected >= len(ids):
                return True
            if any(p.poll() is not None for p in procs):
                console.print("[red]a worker exited early; see the logs under the data dir[/]")
                return False
            time.sleep(0.5)
    console.print(f"[red]timed out after {timeout_s}s[/]")
    return False


def _show_results(console: Console, engine, ids: list[uuid.UUID]) -> None:  # noqa: ANN001
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT p.external_id, j.status, j.error_code, l.content, l.random_weights, g.box, g.score, g.fallback,"
            "       j.work -> 'duplicates' AS dups, j.timings_ms"
            "  FROM enrichment_jobs j JOIN products p ON p.id = j.product_id"
            "  LEFT JOIN listings l ON l.id = j.listing_id LEFT JOIN groundings g ON g.id = l.grounding_id"
            " WHERE j.event_id = ANY(:ids) ORDER BY j.id"), {"ids": ids}).all()
    table = Table(title="Enriched listings", show_lines=True)
    for col in ("product", "title", "attributes (value · confidence · source)", "grounding", "duplicates"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r.status != "done":
            table.add_row(r.external_id[:18], f"[red]{r.status} {r.error_code or ''}[/]", "", "", "")
            continue
        attrs = "\n".join(f"{k}: {a['value']} · {a['confidence']:.2f} · {a['source']}"
                          for k, a in r.content["attributes"].items())
        ground = "full image (fallback)" if r.fallback else f"box {[round(x) for x in r.box]} score {r.score:.2f}"
        dups = "\n".join(f"{d['kind']} of {d.get('duplicate_of_product') or '?'}" for d in (r.dups or [])) or "-"
        reused = " [dim](reused, no model work)[/]" if "model" not in (r.timings_ms or {}) and "ground" not in (r.timings_ms or {}) else ""
        table.add_row(r.external_id[:18], r.content["title"][:60] + reused, attrs or "-", ground, dups)
    console.print(table)
    done = [r for r in rows if r.status == "done"]
    if not done:
        return
    probe = done[0].external_id
    sql = "SELECT * FROM catalog.similar_products('demo', :p, 5, false)"
    with engine.connect() as conn:
        try:
            sims = conn.execute(text(sql), {"p": probe}).mappings().all()
        except Exception as exc:  # noqa: BLE001
            console.print(f"[yellow]similarity query unavailable: {str(exc).splitlines()[0]}[/]")
            return
    console.print(f"\n[bold]psql>[/] SELECT * FROM catalog.similar_products('demo', '{probe}', 5, false);")
    sim_table = Table()
    for key in (sims[0].keys() if sims else ["external_id", "distance"]):
        sim_table.add_column(str(key))
    for s in sims:
        sim_table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in s.values()])
    console.print(sim_table)
