"""Tenants, merchants and products: the catalog rows product events create and update."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.tables import Merchant, Product, Tenant


def ensure_tenant_and_merchant(session: Session, tenant_id: str, merchant_id: str) -> None:
    session.execute(insert(Tenant).values(id=tenant_id).on_conflict_do_nothing())
    session.execute(insert(Merchant).values(tenant_id=tenant_id, id=merchant_id).on_conflict_do_nothing())


def lock_by_external_id(session: Session, tenant_id: str, external_id: str) -> Product | None:
    """The product row, locked for this transaction (the version guard compares under the lock)."""
    return session.scalar(select(Product).where(Product.tenant_id == tenant_id, Product.external_id == external_id)
                          .with_for_update())


def add(session: Session, product: Product) -> Product:
    session.add(product)
    session.flush()
    return product


def get(session: Session, product_id: int) -> Product | None:
    return session.get(Product, product_id)


def lock_shared(session: Session, product_id: int) -> Product | None:
    """The product row under ``FOR SHARE`` for the rest of the transaction: a stage compares its
    job's version with the row's ``version`` and reads the text it runs on, and intake's update of
    the row (``lock_by_external_id``, ``FOR UPDATE``) waits until that transaction has ended."""
    return session.get(Product, product_id, with_for_update={"read": True})
