"""Transaction-scoped advisory locks: periodic jobs (pair builder, reconciler) run one at a time.

The lock is released when the caller's transaction ends, so a crashed run never leaves it held.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session


def try_xact_lock(session: Session, key: int) -> bool:
    """Take advisory lock ``key`` for the rest of this transaction; False when another holds it."""
    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar_one())
