"""Committed rows for the pipeline tests that need other connections to see them (locks, heartbeats)."""

from __future__ import annotations

import uuid

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from db.tables import EnrichmentJob, InboxEvent, Merchant, Product, Tenant


def commit_job_at(engine: Engine, prefix: str, stage: str) -> tuple[str, int]:
    """A new tenant with one product (version 1) and one job at ``stage``, committed (as the
    superuser: seeding only); returns (tenant id, job id). The caller deletes the tenant's rows."""
    tenant = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with Session(engine) as s, s.begin():
        s.add(Tenant(id=tenant))
        s.flush()
        s.add(Merchant(tenant_id=tenant, id="m"))
        s.flush()
        product = Product(tenant_id=tenant, merchant_id="m", external_id="p", version=1, category="dress")
        event = InboxEvent(event_id=uuid.uuid4(), tenant_id=tenant, event_type="product.created", status="accepted")
        s.add_all([product, event])
        s.flush()
        job = EnrichmentJob(tenant_id=tenant, event_id=event.event_id, product_id=product.id, product_version=1,
                            stage=stage)
        s.add(job)
        s.flush()
        return tenant, job.id
