"""Day two, end to end, the way production runs it.

Real RabbitMQ, real worker processes, the embedded Postgres. The workers run as the non-owner
runtime role under forced row-level security; every maintenance step is the `enrich` command an
operator types, running as the maintenance role. The two workers are configured differently: the
events+cpu worker has no model weights at all (its model settings point nowhere), and the GPU
worker's configuration (the tiny models) stops matching the registry as soon as a candidate is
promoted, so it must follow the registry to serve it.

enrich → review (edits, rejections, accepts) → build pairs → train a candidate → the gate refuses
→ forced promotion with a reason → the GPU worker switches without a restart → the reconciler
re-enriches every product once with the new version and then finds nothing → backfill a new clip
version → compare → activate → similar_products returns every product → drop the old version.
After each step the invariants are checked and a row is added to the table printed at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tasks.events import product_event_payload
from tasks.feedback.reviews import review_event_payload
from tests.conftest import own_database
from tests.integration.harness import REPO, Deployment, base_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A database of its own: the scenario promotes models and reconciles the whole catalog, which
# must see only its own products (and must not change the models the other suites run with).
pg_url, engine = own_database("day_two")

TENANTS = ("day2-a", "day2-b")
PER_TENANT = 3


@dataclass
class Row:
    step: str
    products: int
    listings: int
    enriched_events: int
    jobs_done: int
    violations: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    dep: Deployment
    engine: Engine
    events: list[dict[str, Any]] = field(default_factory=list)  # every listing.* event received so far
    table: list[Row] = field(default_factory=list)

    def enrich(self, *args: str, ok: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "workers", *args], cwd=REPO, env={**self.dep.env, **(env or {})},
                             capture_output=True, text=True, timeout=300)
        if ok:
            assert res.returncode == 0, f"enrich {' '.join(args)} failed:\n{res.stdout}\n{res.stderr[-3000:]}"
        return res

    def drain(self) -> None:
        self.events.extend(self.dep.drain_listing_events())

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(query), params).all())

    def wait(self, what: str, condition: Any, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if any(p.poll() is not None for p in self.dep.procs):
                raise AssertionError("a worker died:\n" + self.dep.logs())
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n" + self.dep.logs())

    def check(self, step: str) -> Row:
        """The invariants after ``step``; a violation fails the test with the whole table so far."""
        time.sleep(1.0)  # let the relay publish what the last commit wrote
        self.drain()
        violations = invariants(self.sql, self.events)
        row = Row(step, self.sql("SELECT count(*) FROM products WHERE tenant_id = ANY(:t)", t=list(TENANTS))[0][0],
                  self.sql("SELECT count(*) FROM listings WHERE tenant_id = ANY(:t)", t=list(TENANTS))[0][0],
                  sum(1 for e in self.events if e["event_type"] == "listing.enriched"),
                  self.sql("SELECT count(*) FROM enrichment_jobs WHERE tenant_id = ANY(:t) AND status = 'done'",
                           t=list(TENANTS))[0][0], violations)
        self.table.append(row)
        assert not violations, render(self.table) + "\n" + "\n".join(violations)
        return row


def invariants(sql: Any, events: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    t = list(TENANTS)
    # every accepted product event is final once: one job, done or failed
    for r in sql("SELECT i.event_id, count(j.id) AS jobs, bool_and(j.status IN ('done', 'failed', 'superseded')) AS final "
                 "FROM inbox_events i LEFT JOIN enrichment_jobs j ON j.event_id = i.event_id "
                 "WHERE i.tenant_id = ANY(:t) AND i.status = 'accepted' AND i.event_type <> 'listing.reviewed' "
                 "GROUP BY i.event_id", t=t):
        if r.jobs != 1 or not r.final:
            out.append(f"event {r.event_id}: {r.jobs} jobs, final={r.final}")
    # one listing per (tenant, product, version, model version)
    for r in sql("SELECT tenant_id, product_id, product_version, model_version_id, count(*) AS n FROM listings "
                 "WHERE tenant_id = ANY(:t) GROUP BY 1, 2, 3, 4 HAVING count(*) > 1", t=t):
        out.append(f"{r.n} listings for product {r.product_id} v{r.product_version} model {r.model_version_id}")
    # one listing.enriched per listing row, none for anything else
    listing_ids = {r.id: r.tenant_id for r in sql("SELECT id, tenant_id FROM listings WHERE tenant_id = ANY(:t)", t=t)}
    enriched = Counter(e["listing"]["listing_id"] for e in events if e["event_type"] == "listing.enriched"
                       and e["tenant_id"] in TENANTS)
    for lid in listing_ids:
        if enriched[lid] != 1:
            out.append(f"listing {lid}: {enriched[lid]} listing.enriched events")
    out += [f"listing.enriched for unknown listing {lid}" for lid in enriched if lid not in listing_ids]
    # no orphans
    out += [f"listing {r.id} has no embedding" for r in sql(
        "SELECT l.id FROM listings l WHERE l.tenant_id = ANY(:t) AND NOT EXISTS "
        "(SELECT 1 FROM embeddings e WHERE e.listing_id = l.id)", t=t)]
    out += [f"listing {r.id} has no done job" for r in sql(
        "SELECT l.id FROM listings l WHERE l.tenant_id = ANY(:t) AND NOT EXISTS "
        "(SELECT 1 FROM enrichment_jobs j WHERE j.listing_id = l.id AND j.status = 'done')", t=t)]
    out += [f"job {r.id} is done without its listing" for r in sql(
        "SELECT j.id FROM enrichment_jobs j LEFT JOIN listings l ON l.id = j.listing_id "
        "WHERE j.tenant_id = ANY(:t) AND j.status = 'done' AND l.id IS NULL", t=t)]
    # nothing crosses tenants
    out += [f"cross-tenant row: {r.what} {r.id}" for r in sql(
        "SELECT 'listing' AS what, l.id FROM listings l JOIN products p ON p.id = l.product_id "
        "WHERE l.tenant_id = ANY(:t) AND p.tenant_id <> l.tenant_id "
        "UNION ALL SELECT 'embedding', e.id FROM embeddings e JOIN listings l ON l.id = e.listing_id "
        "WHERE e.tenant_id = ANY(:t) AND e.tenant_id <> l.tenant_id "
        "UNION ALL SELECT 'job', j.id FROM enrichment_jobs j JOIN products p ON p.id = j.product_id "
        "WHERE j.tenant_id = ANY(:t) AND p.tenant_id <> j.tenant_id", t=t)]
    out += [f"listing.enriched for listing {e['listing']['listing_id']} names tenant {e['tenant_id']}"
            for e in events if e["event_type"] == "listing.enriched" and e["listing"]["listing_id"] in listing_ids
            and listing_ids[e["listing"]["listing_id"]] != e["tenant_id"]]
    return out


def render(table: list[Row]) -> str:
    head = f"{'step':<50} {'products':>8} {'listings':>8} {'enriched':>8} {'jobs done':>9}  violations"
    lines = [head, "-" * len(head)]
    for r in table:
        lines.append(f"{r.step:<50} {r.products:>8} {r.listings:>8} {r.enriched_events:>8} {r.jobs_done:>9}  "
                     f"{len(r.violations)}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def scenario(rabbitmq, pg_url: str, engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:  # noqa: ANN001
    data_dir: Path = tmp_path_factory.mktemp("day2")
    namespace = f"d2{uuid.uuid4().hex[:8]}"
    env = base_env(pg_url=pg_url, data_dir=data_dir, namespace=namespace,
                   ENRICH_DB__RUNTIME_ROLE="enrich_worker", ENRICH_MODELS__REGISTRY_POLL_S="2",
                   ENRICH_WORKERS__RETRAIN_SETTLE_S="0", ENRICH_WORKERS__RETRAIN_HOLDOUT_FRACTION="0.5",
                   ENRICH_MODELS__MAX_NEW_TOKENS="48")
    dep = Deployment(env=env, data_dir=data_dir, namespace=namespace, engine=engine)
    try:
        # A CPU worker with no model weights at all: it never needs them.
        nowhere = str(data_dir / "no-such-weights")
        dep.start_worker("events,cpu", extra_env={"ENRICH_MODELS__PROFILE": "pretrained",
                                                  "ENRICH_MODELS__DETECTOR": nowhere + "/detector",
                                                  "ENRICH_MODELS__VLM": nowhere + "/vlm",
                                                  "ENRICH_MODELS__CLIP": nowhere + "/clip"})
        dep.start_worker("gpu")
        yield Scenario(dep, engine)
    finally:
        dep.stop_workers()
        dep.delete_broker_objects()


def _active(s: Scenario, kind: str) -> int:
    return s.sql("SELECT id FROM model_versions WHERE kind = :k AND status = 'active'", k=kind)[0][0]


def test_day_two(scenario: Scenario, sample_photos: list[tuple[Path, str]], tmp_path: Path) -> None:  # noqa: PLR0915
    s = scenario
    photos = sample_photos[: len(TENANTS) * PER_TENANT]
    late_photo = sample_photos[len(photos)]
    products: dict[str, list[str]] = {t: [] for t in TENANTS}

    # 1. enrich N products in two tenants
    for n, (path, category) in enumerate(photos):
        tenant = TENANTS[n % len(TENANTS)]
        ext = f"p{n}"
        products[tenant].append(ext)
        s.dep.publish(product_event_payload(tenant_id=tenant, merchant_id="m1", external_id=ext, version=1,
                                            category=category, image_urls=[path.as_uri()], title=f"{category} {n}",
                                            description="Photographed flat.", attributes={"brand": "Acme"}))
    total = len(photos)
    s.wait("the first enrichment", lambda: s.sql(
        "SELECT count(*) FROM enrichment_jobs WHERE tenant_id = ANY(:t) AND status IN ('done', 'failed')",
        t=list(TENANTS))[0][0] == total)
    first = s.check("1. enrich 6 products (cpu worker: no weights)")
    assert first.listings == total and first.jobs_done == total
    vlm_before, clip_before = _active(s, "vlm"), _active(s, "clip")

    # 2. merchant reviews: edits, a rejection, accepts
    listings = {r.external_id: r for r in s.sql(
        "SELECT p.external_id, l.id, l.tenant_id FROM listings l JOIN products p ON p.id = l.product_id "
        "WHERE l.tenant_id = ANY(:t)", t=list(TENANTS))}
    decisions = {"p0": "edited", "p1": "edited", "p2": "rejected", "p3": "edited", "p4": "accepted", "p5": "edited"}
    for ext, decision in decisions.items():
        row = listings[ext]
        corrected = {"title": f"Merchant title for {ext}", "attributes": {"color": "navy"}} if decision == "edited" else None
        s.dep.publish(review_event_payload(tenant_id=row.tenant_id, merchant_id="m1", listing_id=row.id,
                                           decision=decision, corrected=corrected))
    s.wait("the reviews", lambda: s.sql("SELECT count(*) FROM review_feedback WHERE tenant_id = ANY(:t)",
                                        t=list(TENANTS))[0][0] == len(decisions))
    for r in s.sql("SELECT c.external_id, c.title, c.status FROM catalog.current_listings c "
                   "WHERE c.tenant_id = ANY(:t)", t=list(TENANTS)):
        if decisions.get(r.external_id) == "edited":
            assert r.title == f"Merchant title for {r.external_id}" and r.status == "edited"
    s.check("2. reviews: 4 edits, 1 rejection, 1 accept")

    # 3. build pairs (maintenance role)
    built = s.enrich("retrain", "build-pairs")
    dataset = re.search(r"dataset (\S+): (\d+) pairs", built.stdout)
    assert dataset and int(dataset.group(2)) >= 1, built.stdout
    again = s.enrich("retrain", "build-pairs")
    assert "no dataset written" in again.stdout  # the watermark moved past what was read
    s.check("3. build pairs")

    # 4. train a candidate (tiny) from the active listing model
    trained = s.enrich("retrain", "train", "--dataset", dataset.group(1), "--steps", "2", "--eval-tokens", "32",
                       "--lora-rank", "4")
    candidate = int(re.search(r"candidate vlm version (\d+)", trained.stdout).group(1))
    s.check("4. train a candidate")

    # 5. the gate refuses it (it cannot beat the active model by a margin of 100 %) …
    refused = s.enrich("retrain", "promote", "--model-version", str(candidate), ok=False,
                       env={"ENRICH_MODELS__PROMOTION_MARGIN": "1.0"})
    assert refused.returncode == 2 and "not promoted" in refused.stderr, refused.stderr
    assert _active(s, "vlm") == vlm_before
    listed = s.enrich("retrain", "list")
    assert re.search(rf"^\s*{candidate}\s+candidate .*gate: refused", listed.stdout, re.M), listed.stdout
    # … and an operator forces it, saying why
    forced = s.enrich("retrain", "promote", "--model-version", str(candidate), "--force", "--reason",
                      "day-two rehearsal", env={"ENRICH_MODELS__PROMOTION_MARGIN": "1.0"})
    assert "is active" in forced.stdout and _active(s, "vlm") == candidate
    s.check("5. gate refuses; forced promotion")

    # 6.–7. the reconciler re-enriches every product once with the new version, the GPU worker
    # switching without a restart; a second pass finds nothing to do
    requeued = s.enrich("reconcile")
    assert f"re-queued {total} products" in requeued.stdout, requeued.stdout
    s.wait("every product enriched by the candidate", lambda: s.sql(
        "SELECT count(DISTINCT l.product_id) FROM listings l WHERE l.tenant_id = ANY(:t) AND l.model_version_id = :v",
        t=list(TENANTS), v=candidate)[0][0] == total and s.sql(
        "SELECT count(*) FROM enrichment_jobs WHERE tenant_id = ANY(:t) AND status NOT IN ('done', 'failed', 'superseded')",
        t=list(TENANTS))[0][0] == 0, timeout=300)
    assert "models.switched" in (s.dep.data_dir / "worker-gpu.log").read_text()
    per_product = s.sql("SELECT product_id, count(*) AS n FROM listings WHERE tenant_id = ANY(:t) "
                        "AND model_version_id = :v GROUP BY 1", t=list(TENANTS), v=candidate)
    assert len(per_product) == total and all(r.n == 1 for r in per_product)
    assert s.sql("SELECT bool_and(random_weights) FROM listings WHERE model_version_id = :v", v=candidate)[0][0]
    idle = s.enrich("reconcile")
    assert "re-queued 0 products" in idle.stdout, idle.stdout
    after = s.check("6-7. reconcile with the new vlm; second pass idle")
    assert after.listings == 2 * total and after.enriched_events == 2 * total

    # 8. backfill a new clip version (a tiny clip with other weights, saved as a directory)
    from models.embeddings import ClipEmbedder, save_clip

    tiny = ClipEmbedder("tiny", profile="tiny", device="cpu", seed=7)
    clip_dir = save_clip(tiny, tmp_path / "clip-v2", random_weights=True, base=tiny.version().canonical)
    s.enrich("backfill", "--model", str(clip_dir), "--profile", "pretrained")
    new_clip = s.sql("SELECT id FROM model_versions WHERE kind = 'clip' AND name = :u", u=str(clip_dir))[0][0]
    s.check("8. backfill a new clip version")

    # 9. compare → activate → every product is found again
    compared = s.enrich("embeddings", "compare", str(new_clip))
    assert f"coverage {2 * total}/{2 * total}" in compared.stdout, compared.stdout
    s.enrich("embeddings", "activate", str(new_clip))
    assert _active(s, "clip") == new_clip
    for tenant, exts in products.items():
        found: set[str] = set()
        for ext in exts:
            found |= {r.external_id for r in s.sql(
                "SELECT external_id FROM catalog.similar_products(:t, :p, 10)", t=tenant, p=ext)}
        assert found == set(exts), (tenant, found)
    s.check("9. compare, activate, every product searchable")

    # 9b. the operator changes the HNSW graph: reindex rebuilds the active size's indexes CONCURRENTLY,
    # a second run is idle, and searches keep working
    graph = {"ENRICH_DB__HNSW_M": "12", "ENRICH_DB__HNSW_EF_CONSTRUCTION": "40"}
    rebuilt = s.enrich("embeddings", "reindex", env=graph)
    assert "rebuilt" in rebuilt.stdout and "m=12, ef_construction=40" in rebuilt.stdout, rebuilt.stdout
    assert "already are" in s.enrich("embeddings", "reindex", env=graph).stdout
    dims = s.sql("SELECT dims FROM model_versions WHERE id = :v", v=new_clip)[0][0]
    options = s.sql("SELECT reloptions FROM pg_class WHERE relname = :n", n=f"ix_embeddings_image_embedding_{dims}_hnsw")
    assert sorted(options[0][0]) == ["ef_construction=40", "m=12"]
    tenant, exts = next(iter(products.items()))
    found = set()
    for ext in exts:
        found |= {r.external_id for r in s.sql("SELECT external_id FROM catalog.similar_products(:t, :p, 10)",
                                               t=tenant, p=ext)}
    assert found == set(exts), found

    # 10. drop the old clip version; a product created now is embedded by the active one
    s.enrich("embeddings", "drop", str(clip_before), "--yes")
    assert s.sql("SELECT count(*) FROM embeddings WHERE model_version_id = :v", v=clip_before)[0][0] == 0
    path, category = late_photo
    late = s.dep.publish(product_event_payload(tenant_id=TENANTS[0], merchant_id="m1", external_id="late", version=1,
                                               category=category, image_urls=[path.as_uri()], title="late"))
    s.dep.wait_finished([late])
    assert s.sql("SELECT e.model_version_id FROM embeddings e JOIN products p ON p.id = e.product_id "
                 "WHERE p.external_id = 'late'")[0][0] == new_clip
    s.check("10. drop the old clip; new product on the new one")
    print("\nday-two scenario: invariants after each step\n" + render(s.table))
