"""``enrich prune`` and ``enrich dead-letters …`` as an operator runs them: a real subprocess whose
login is only granted ``enrich_admin`` (the README's instruction), against committed rows of
another tenant in a database of its own, with the embedded broker for replays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kombu import Connection
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tasks.events import product_event_payload
from tests.conftest import ADMIN_ROLE, REPO_ROOT, login_role, own_database
from tests.db.catalog_rows import add_products, add_tenant
from tests.security.test_maintenance_role import enrich
from tests.tasks.maintenance.bookkeeping_rows import DAY, add_dead_letter, add_event, add_job, add_outbox, ids
from workers.settings import Settings
from workers.topology import build_topology

TENANT = "cli-ret"


pg_url, engine = own_database("retention_cli")  # committed rows of its own: nobody else's tests see them


@pytest.fixture(scope="module")
def database(pg_url: str, engine: Engine) -> Iterator[SimpleNamespace]:
    event = product_event_payload(tenant_id=TENANT, merchant_id="m1", external_id="sku-dl", version=1,
                                  category="hat", image_urls=["https://img.example/dl.jpg"])
    with Session(engine) as s, s.begin():  # seeded as the superuser; the commands never run as it
        add_tenant(s, TENANT)
        p1, p2 = add_products(s, TENANT, ["a", "b"], ["hat", "hat"])
        old_job, old_event = add_job(s, TENANT, p1, status="failed", created=9 * DAY, finished=9 * DAY,
                                     error_code="fetch_timeout")
        new_job, _ = add_job(s, TENANT, p1, status="done", created=8 * DAY, finished=8 * DAY)
        live_job, _ = add_job(s, TENANT, p2, status="running", created=9 * DAY)
        stale = add_event(s, TENANT, age=8 * DAY, status="stale")
        expired_out, kept_out = add_outbox(s, published=2 * DAY), add_outbox(s, published=None)
        task_letter = add_dead_letter(s, age=DAY, routing_key="cpu", headers={"task": "catalog.fetch"},
                                      body=b"[[1], {}, {}]")
        event_letter = add_dead_letter(s, age=DAY, body=json.dumps(event).encode(), tenant=TENANT)
    with login_role(pg_url, member_of=(ADMIN_ROLE,), inherit=False) as admin_url:
        yield SimpleNamespace(engine=engine, admin_url=admin_url, old_job=old_job, old_event=old_event,
                              new_job=new_job, live_job=live_job, stale=stale, expired_out=expired_out,
                              kept_out=kept_out, task_letter=task_letter, event_letter=event_letter, event=event)


def _enrich(db: SimpleNamespace, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as the operator's login, which is granted ``enrich_admin`` and nothing else."""
    return enrich(db.admin_url, data_dir, *args)


def _superuser(db: SimpleNamespace, table: str, column: str = "id") -> set:
    with Session(db.engine) as s:
        return ids(s, table, column)


def test_prune_dry_run_counts_then_prune_removes_and_status_keeps_its_figures(database: SimpleNamespace,
                                                                             tmp_path: Path) -> None:
    db = database
    before = json.loads(_enrich(db, tmp_path, "status", "--json").stdout)
    dry = _enrich(db, tmp_path, "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"outbox": 1, "result_documents": 0, "jobs": 1, "inbox": 2, "dead_letters": 0,
                                      "summaries": 0}
    assert db.old_job in _superuser(db, "enrichment_jobs") and db.expired_out in _superuser(db, "outbox")

    res = _enrich(db, tmp_path, "prune", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["caught_up"] is True
    assert out["deleted"] == {"outbox": 1, "result_documents": 0, "jobs": 1, "inbox": 2, "dead_letters": 0,
                              "summaries": 0}
    assert _superuser(db, "enrichment_jobs") == {db.new_job, db.live_job}
    assert not _superuser(db, "inbox_events", "event_id") & {db.old_event, db.stale}
    assert _superuser(db, "outbox") == {db.kept_out}
    after = json.loads(_enrich(db, tmp_path, "status", "--json").stdout)
    for key in ("jobs_by_status", "failures_by_code", "intake"):
        assert after[key] == before[key], key
    assert after["failures_by_code"] == {"fetch_timeout": 1}
    human = _enrich(db, tmp_path, "prune")
    assert human.returncode == 0 and "pruned outbox=0" in human.stdout and "(caught up)" in human.stdout


def test_dead_letters_list_discard_replay(database: SimpleNamespace, tmp_path: Path) -> None:
    db = database
    listed = _enrich(db, tmp_path, "dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {v["id"] for v in json.loads(listed.stdout)} >= {db.task_letter, db.event_letter}

    refused = _enrich(db, tmp_path, "dead-letters", "replay", str(db.task_letter))
    assert refused.returncode == 1 and "not replayed: not a domain event" in refused.stdout
    discarded = _enrich(db, tmp_path, "dead-letters", "discard", str(db.task_letter))
    assert discarded.returncode == 0 and f"{db.task_letter}: discarded" in discarded.stdout
    replayed = _enrich(db, tmp_path, "dead-letters", "replay", str(db.event_letter))
    assert replayed.returncode == 0, replayed.stderr + replayed.stdout
    assert db.event["event_id"] in replayed.stdout

    settings = Settings(data_dir=tmp_path)
    with Connection(f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}") as conn:
        message = build_topology(settings, rabbitmq=False).product_events(conn.default_channel).get(no_ack=True)
    assert message is not None and json.loads(message.body) == db.event
    human = _enrich(db, tmp_path, "dead-letters", "list")
    assert "no unresolved dead letters" in human.stdout
    everything = _enrich(db, tmp_path, "dead-letters", "list", "--all")
    assert "replayed" in everything.stdout and "discarded" in everything.stdout


def test_jobs_kept_shorter_than_their_documents_is_refused(tmp_path: Path) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    full.update({"ENRICH_DATA_DIR": str(tmp_path), "ENRICH_RETENTION__JOBS_KEEP_S": "3600",
                 "ENRICH_RETENTION__RESULTS_KEEP_S": "7200"})
    res = subprocess.run([sys.executable, "-m", "workers", "config"], cwd=REPO_ROOT, env=full, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "ENRICH_RETENTION__JOBS_KEEP_S" in res.stderr and "Traceback" not in res.stderr
