"""``enrich doctor``: a truthful report of what this installation can reach and run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import typer

from workers.settings import Settings, get_settings


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _database(settings: Settings) -> list[Check]:
    from db import migrate
    from db.engine import DatabaseUnavailable, check_database
    from workers.database import get_engine

    try:
        engine = get_engine(settings)
        info = check_database(engine)
    except DatabaseUnavailable as exc:
        return [Check("database", False, str(exc))]
    where = "embedded" if not settings.db.url else engine.url.render_as_string(hide_password=True)
    checks = [Check("database", True, f"PostgreSQL {info['server_version']} ({where})")]
    installed, available = info["pgvector_installed"], info["pgvector_available"]
    checks.append(Check("pgvector", installed is not None,
                        f"installed {installed}" if installed else f"available {available}, not installed: run `enrich db upgrade`"))
    current, head = migrate.current_revision(engine), migrate.head_revision()
    checks.append(Check("migrations", current == head,
                        f"at head {head}" if current == head else f"at {current or 'empty'}, head is {head}: run `enrich db upgrade`"))
    return checks


def _broker(settings: Settings) -> list[Check]:
    from kombu import Connection

    from workers.broker import broker_url

    url = broker_url(settings)
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            shown = conn.as_uri()
    except Exception as exc:  # noqa: BLE001
        return [Check("broker", False, f"{url.split('@')[-1]} unreachable ({exc}); fix ENRICH_BROKER__URL")]
    kind = "embedded (single machine)" if not settings.broker.url else shown
    return [Check("broker", True, kind)]


def _storage(settings: Settings) -> list[Check]:
    from workers.storage import check_storage

    try:
        detail = check_storage(settings)
    except Exception as exc:  # noqa: BLE001
        return [Check("storage", False, f"{settings.originals_uri}: {exc}; fix ENRICH_STORAGE__ORIGINALS_URI")]
    return [Check("storage", True, detail)]


def _torch(settings: Settings) -> list[Check]:
    import torch

    cuda = torch.cuda.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    return [Check("torch", True, f"torch {torch.__version__}, CUDA {'available' if cuda else 'not available'}; GPUs: {gpus}")]


def _models(settings: Settings) -> list[Check]:
    from models.loading import weights_status

    m = settings.models
    checks = [Check("model profile", True, f"{m.profile.value} (device {m.device})")]
    for role, ref in (("detector", m.detector), ("vlm", m.vlm), ("clip", m.clip)):
        present, detail = weights_status(ref, profile=m.profile.value, cache_dir=settings.model_cache_dir,
                                         s3_endpoint_url=settings.storage.s3_endpoint_url)
        checks.append(Check(f"weights: {role}", present, detail))
    return checks


SECTIONS: list[Callable[[Settings], list[Check]]] = [_database, _broker, _storage, _torch, _models]


def run_checks(settings: Settings) -> list[Check]:
    out: list[Check] = []
    for section in SECTIONS:
        try:
            out.extend(section(settings))
        except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
            out.append(Check(section.__name__.strip("_"), False, f"check crashed: {type(exc).__name__}: {exc}"))
    return out


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor() -> None:
        """Check database, pgvector, migrations, broker, storage, torch/CUDA and model weights."""
        checks = run_checks(get_settings())
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = typer.style(" ok ", fg="green") if c.ok else typer.style("FAIL", fg="red")
            typer.echo(f"[{mark}] {c.name.ljust(width)}  {c.detail}")
        failed = [c for c in checks if not c.ok]
        typer.echo(f"{len(checks) - len(failed)} ok, {len(failed)} failing")
        raise typer.Exit(1 if failed else 0)
