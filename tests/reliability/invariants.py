"""The four invariants, checked over everything a scenario published and everything the system
wrote and sent back (DESIGN.md section 4; issue 7).

I1  every accepted event ends exactly once: one job, in ``done`` (with its listing) or ``failed``
    (with an error code).
I2  published = done + failed + rejected-at-intake (``rejected`` invalid events and ``stale``
    versions). On the ``listing.*`` side every published event id is the ``causation_id`` of
    exactly one distinct outgoing event, of the kind its outcome says (enriched for done; failed
    with the job's code, ``invalid_event`` or ``stale_version`` otherwise). Outbox delivery is
    at-least-once: a crash after the broker confirmed a publish and before the row was marked
    published makes the relay send the *same* message (same ``event_id``) again. Such a copy is
    legitimate and counted as ``redelivered`` (consumers dedupe on ``event_id``); a *second
    distinct event* for one cause is a duplicate and breaks I2. No outbox row is left unpublished.
I3  one listing per (tenant, product, version, model version); one embedding row per (listing,
    model version); no orphans: every listing has its embedding and a done job pointing at it,
    every done job's listing exists.
I4  nothing crosses tenants: jobs, listings, embeddings, images and groundings referenced by a
    tenant's rows belong to that tenant, and every outgoing message names the tenant (and
    product) of the event that caused it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

REJECTED_AT_INTAKE = {"rejected", "stale"}


@dataclass
class InvariantReport:
    published: int = 0
    done: int = 0
    failed_by_code: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0  # same message (same event_id) delivered again: legitimate at-least-once
    violations: list[str] = field(default_factory=list)

    def fail(self, invariant: str, what: str) -> None:
        self.violations.append(f"{invariant}: {what}")

    @property
    def ok(self) -> bool:
        return not self.violations and self.lost == 0 and self.duplicated == 0

    def explain(self) -> str:
        head = (f"published={self.published} done={self.done} failed={dict(self.failed_by_code)} "
                f"rejected={self.rejected} lost={self.lost} duplicated={self.duplicated} "
                f"redelivered={self.redelivered}")
        return "\n".join([head, *self.violations[:40]])


def _rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def check_invariants(engine: Engine, published: Mapping[uuid.UUID, str | None], messages: Iterable[Mapping[str, Any]],
                     tenants: Iterable[str]) -> InvariantReport:
    """``published``: every distinct event id the scenario published → its tenant (None when the
    event was deliberately unparseable); ``messages``: every listing.* message drained from the
    scenario's ``listing-events`` queue; ``tenants``: the scenario's tenants (unique per scenario)."""
    report = InvariantReport(published=len(published))
    ids = list(published)
    tenant_list = sorted(set(tenants))
    msgs = list(messages)

    # ---- I1: exactly one terminal outcome per accepted event -----------------------------------
    inbox = {r.event_id: r for r in _rows(engine, "SELECT event_id, tenant_id, status FROM inbox_events "
                                                  "WHERE event_id = ANY(:ids)", ids=ids)}
    jobs_by_event: dict[uuid.UUID, list[Any]] = {}
    for r in _rows(engine, "SELECT j.id, j.event_id, j.tenant_id, j.product_id, j.product_version, j.status, "
                           "j.error_code, j.listing_id, p.external_id, p.tenant_id AS product_tenant "
                           "FROM enrichment_jobs j JOIN products p ON p.id = j.product_id "
                           "WHERE j.event_id = ANY(:ids)", ids=ids):
        jobs_by_event.setdefault(r.event_id, []).append(r)
    outcome: dict[uuid.UUID, str] = {}  # event id → done | failed:<code> | rejected | stale
    for eid in ids:
        row = inbox.get(eid)
        if row is None:
            report.lost += 1
            report.fail("I1", f"event {eid} never reached the inbox")
            continue
        if row.status in REJECTED_AT_INTAKE:
            report.rejected += 1
            outcome[eid] = row.status
            if jobs_by_event.get(eid):
                report.fail("I1", f"event {eid} was {row.status} at intake but has a job")
            continue
        found = jobs_by_event.get(eid, [])
        if len(found) != 1:
            report.lost += not found
            report.duplicated += max(0, len(found) - 1)
            report.fail("I1", f"accepted event {eid} has {len(found)} jobs")
            continue
        job = found[0]
        if job.status == "done":
            if job.listing_id is None:
                report.fail("I1", f"job {job.id} done without a listing")
            report.done += 1
            outcome[eid] = "done"
        elif job.status == "failed":
            if not job.error_code:
                report.fail("I1", f"job {job.id} failed without an error code")
            report.failed_by_code[job.error_code or "?"] += 1
            outcome[eid] = f"failed:{job.error_code}"
        else:
            report.lost += 1
            report.fail("I1", f"job {job.id} (event {eid}) never ended: status={job.status}")
        if published[eid] is not None and job.tenant_id != published[eid]:
            report.fail("I4", f"job {job.id} has tenant {job.tenant_id}, its event was published for {published[eid]}")

    # ---- I2: published = done + failed + rejected; one distinct outgoing event per cause --------
    if report.done + sum(report.failed_by_code.values()) + report.rejected + report.lost != report.published:
        report.fail("I2", "published != done + failed + rejected + lost")
    by_cause: dict[str, dict[str, Mapping[str, Any]]] = {}
    copies: Counter[str] = Counter()
    for m in msgs:
        by_cause.setdefault(str(m.get("causation_id")), {})[str(m["event_id"])] = m
        copies[str(m["event_id"])] += 1
    report.redelivered = sum(n - 1 for n in copies.values())
    wanted = {str(e) for e in ids}
    for cause in set(by_cause) - wanted:
        report.fail("I2", f"outgoing event for cause {cause} that this scenario never published")
    for eid in ids:
        distinct = by_cause.get(str(eid), {})
        if not distinct:
            if eid in outcome:  # it ended, but nobody was told
                report.lost += 1
                report.fail("I2", f"event {eid} ({outcome[eid]}) has no listing.* message")
            continue
        if len(distinct) > 1:
            report.duplicated += len(distinct) - 1
            report.fail("I2", f"event {eid} caused {len(distinct)} distinct listing.* events")
        m = next(iter(distinct.values()))
        kind = outcome.get(eid)
        expected = ("listing.enriched", None) if kind == "done" else (
            ("listing.failed", kind.split(":", 1)[1]) if kind and kind.startswith("failed:") else
            ("listing.failed", "invalid_event") if kind == "rejected" else ("listing.failed", "stale_version"))
        got = (m["event_type"], m.get("code"))
        if kind is not None and got != expected:
            report.fail("I2", f"event {eid} ended {kind} but its message is {got}")
        tenant = published[eid]
        if tenant is not None and m.get("tenant_id") != tenant:
            report.fail("I4", f"message {m['event_id']} for event {eid} names tenant {m.get('tenant_id')}, not {tenant}")
        job = (jobs_by_event.get(eid) or [None])[0]
        if job is not None and (m.get("product") or {}).get("external_id") not in (None, job.external_id):
            report.fail("I4", f"message {m['event_id']} names product {m['product']}, the job's is {job.external_id}")
    pending = _rows(engine, "SELECT message_id FROM outbox WHERE published_at IS NULL AND "
                            "(payload->>'causation_id') = ANY(:ids)", ids=[str(e) for e in ids])
    if pending:
        report.fail("I2", f"{len(pending)} outbox rows never published")

    # ---- I3: one listing per key, one embedding per listing+model version, no orphans -----------
    for r in _rows(engine, "SELECT tenant_id, product_id, product_version, model_version_id, count(*) AS n "
                           "FROM listings WHERE tenant_id = ANY(:t) GROUP BY 1, 2, 3, 4 HAVING count(*) > 1",
                   t=tenant_list):
        report.duplicated += r.n - 1
        report.fail("I3", f"{r.n} listings for {tuple(r)[:4]}")
    for r in _rows(engine, "SELECT listing_id, model_version_id, count(*) AS n FROM embeddings "
                           "WHERE tenant_id = ANY(:t) GROUP BY 1, 2 HAVING count(*) > 1", t=tenant_list):
        report.duplicated += r.n - 1
        report.fail("I3", f"{r.n} embeddings for listing {r.listing_id} model version {r.model_version_id}")
    for r in _rows(engine, "SELECT l.id FROM listings l WHERE l.tenant_id = ANY(:t) AND NOT EXISTS "
                           "(SELECT 1 FROM embeddings e WHERE e.listing_id = l.id)", t=tenant_list):
        report.fail("I3", f"listing {r.id} has no embedding (half-written)")
    for r in _rows(engine, "SELECT l.id FROM listings l WHERE l.tenant_id = ANY(:t) AND NOT EXISTS "
                           "(SELECT 1 FROM enrichment_jobs j WHERE j.listing_id = l.id AND j.status = 'done')",
                   t=tenant_list):
        report.fail("I3", f"listing {r.id} is not the result of any done job (orphan)")
    for r in _rows(engine, "SELECT j.id, j.listing_id FROM enrichment_jobs j LEFT JOIN listings l ON l.id = j.listing_id "
                           "WHERE j.tenant_id = ANY(:t) AND j.status = 'done' AND (l.id IS NULL OR "
                           "l.product_id <> j.product_id OR l.product_version <> j.product_version)", t=tenant_list):
        report.fail("I3", f"done job {r.id} points at listing {r.listing_id}, which is missing or another product's")

    # ---- I4: no row crosses tenants ---------------------------------------------------------------
    crossings = {
        "job→product": "SELECT j.id FROM enrichment_jobs j JOIN products p ON p.id = j.product_id "
                       "WHERE (j.tenant_id = ANY(:t) OR p.tenant_id = ANY(:t)) AND j.tenant_id <> p.tenant_id",
        "listing→product": "SELECT l.id FROM listings l JOIN products p ON p.id = l.product_id "
                           "WHERE (l.tenant_id = ANY(:t) OR p.tenant_id = ANY(:t)) AND l.tenant_id <> p.tenant_id",
        "listing→image": "SELECT l.id FROM listings l JOIN images i ON i.id = l.image_id "
                         "WHERE (l.tenant_id = ANY(:t) OR i.tenant_id = ANY(:t)) AND l.tenant_id <> i.tenant_id",
        "listing→grounding": "SELECT l.id FROM listings l JOIN groundings g ON g.id = l.grounding_id "
                             "WHERE (l.tenant_id = ANY(:t) OR g.tenant_id = ANY(:t)) AND l.tenant_id <> g.tenant_id",
        "embedding→listing": "SELECT e.id FROM embeddings e JOIN listings l ON l.id = e.listing_id "
                             "WHERE (e.tenant_id = ANY(:t) OR l.tenant_id = ANY(:t)) "
                             "AND (e.tenant_id <> l.tenant_id OR e.product_id <> l.product_id)",
        "job→listing": "SELECT j.id FROM enrichment_jobs j JOIN listings l ON l.id = j.listing_id "
                       "WHERE (j.tenant_id = ANY(:t) OR l.tenant_id = ANY(:t)) AND j.tenant_id <> l.tenant_id",
        "outbox→cause": "SELECT o.message_id FROM outbox o JOIN inbox_events i "
                        "ON i.event_id = (o.payload->>'causation_id')::uuid "
                        "WHERE (o.tenant_id = ANY(:t) OR i.tenant_id = ANY(:t)) "
                        "AND o.tenant_id IS DISTINCT FROM i.tenant_id",
    }
    for name, sql in crossings.items():
        for r in _rows(engine, sql, t=tenant_list):
            report.fail("I4", f"{name} crosses tenants: {tuple(r)}")
    return report


def wait_for_messages(drain: Callable[[], list[dict[str, Any]]], store: list[dict[str, Any]],
                      causes: Iterable[uuid.UUID], *, timeout: float = 30.0, settle_s: float = 1.0) -> None:
    """Drain ``listing.*`` messages into ``store`` until every cause has one (bounded), then keep
    draining ``settle_s`` longer so a late duplicate would show up."""
    wanted = {str(c) for c in causes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        store.extend(drain())
        if wanted <= {str(m.get("causation_id")) for m in store}:
            break
        time.sleep(0.3)
    settle = time.monotonic() + settle_s
    while time.monotonic() < settle:
        store.extend(drain())
        time.sleep(0.2)
