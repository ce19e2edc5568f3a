"""Python callers of the ``catalog`` SQL interface (migration 0002; search path of 0013).

The SQL functions are the product: these helpers only bind parameters, run each call in a
savepoint (a rejected search leaves the caller's transaction usable) and turn the documented
SQLSTATEs into typed exceptions. Text search needs a model, which ``db`` never imports: the
caller passes the text embedder in (see :func:`search_by_text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.enums import EmbeddingKind

VectorLike = Sequence[float] | np.ndarray


class SearchError(Exception):
    """A search the database refused; ``sqlstate`` is the documented code."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ProductNotFound(SearchError):
    """SQLSTATE P0002: no product with that external id for that tenant."""


class InvalidSearchArgument(SearchError):
    """SQLSTATE 22023/22004: wrong vector dimension, k out of range, bad target, NULL input."""


class NoActiveEmbeddingModel(SearchError):
    """SQLSTATE 55000: no clip model version is active."""


_ERRORS: dict[str, type[SearchError]] = {
    "P0002": ProductNotFound,
    "22023": InvalidSearchArgument,
    "22004": InvalidSearchArgument,
    "55000": NoActiveEmbeddingModel,
}


@dataclass(frozen=True)
class SimilarProduct:
    external_id: str
    distance: float
    category: str
    title: str


@dataclass(frozen=True)
class ActiveEmbeddingModel:
    model_version_id: int
    name: str
    revision: str
    dims: int
    random_weights: bool


def _as_vector(values: VectorLike) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 1:
        raise InvalidSearchArgument(f"query vector must be 1-dimensional, got shape {arr.shape}", None)
    return arr


def _call(session: Session, sql: str, params: dict[str, object]) -> list[tuple]:
    try:
        with session.begin_nested():
            return [tuple(r) for r in session.execute(text(sql), params)]
    except DBAPIError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        error = _ERRORS.get(sqlstate or "")
        if error is None:
            raise
        primary = getattr(getattr(exc.orig, "diag", None), "message_primary", None) or str(exc.orig)
        raise error(primary, sqlstate) from exc


def similar_products(session: Session, tenant: str, external_id: str, *, k: int = 10,
                     same_category: bool = False) -> list[SimilarProduct]:
    rows = _call(
        session,
        "SELECT external_id, distance, category, title "
        "FROM catalog.similar_products(:tenant, :external_id, :k, :same_category)",
        {"tenant": tenant, "external_id": external_id, "k": k, "same_category": same_category},
    )
    return [SimilarProduct(*r) for r in rows]


def search_by_embedding(session: Session, tenant: str, query: VectorLike, *, k: int = 10,
                        category: str | None = None,
                        target: EmbeddingKind = EmbeddingKind.image) -> list[SimilarProduct]:
    rows = _call(
        session,
        "SELECT external_id, distance, category, title FROM catalog.search_by_embedding("
        "CAST(:tenant AS text), CAST(:query AS vector), CAST(:k AS integer), "
        "CAST(:category AS text), CAST(:target AS text))",
        {"tenant": tenant, "query": _as_vector(query), "k": k, "category": category,
         "target": EmbeddingKind(target).value},
    )
    return [SimilarProduct(*r) for r in rows]


def search_by_text(session: Session, tenant: str, query_text: str,
                   embed_text: Callable[[str], VectorLike], *, k: int = 10,
                   category: str | None = None,
                   target: EmbeddingKind = EmbeddingKind.image) -> list[SimilarProduct]:
    """Text → products: embed with the active clip model's text tower, then search in SQL.

    ``embed_text`` must come from the model named by :func:`active_embedding_model` (a CLIP
    text embedding is comparable with the stored image embeddings, the default target).
    """
    return search_by_embedding(session, tenant, embed_text(query_text), k=k, category=category,
                               target=target)


def explain_search(session: Session, tenant: str, query: VectorLike, *, k: int = 10,
                   category: str | None = None, target: EmbeddingKind = EmbeddingKind.image) -> str:
    """The plan of the index scan behind :func:`search_by_embedding` (same statement, same settings)."""
    rows = _call(
        session,
        "SELECT * FROM catalog.explain_search_by_embedding("
        "CAST(:tenant AS text), CAST(:query AS vector), CAST(:k AS integer), "
        "CAST(:category AS text), CAST(:target AS text))",
        {"tenant": tenant, "query": _as_vector(query), "k": k, "category": category,
         "target": EmbeddingKind(target).value},
    )
    return "\n".join(r[0] for r in rows)


def active_embedding_model(session: Session) -> ActiveEmbeddingModel | None:
    row = session.execute(text("SELECT * FROM catalog.active_embedding_model()")).first()
    return ActiveEmbeddingModel(*row) if row else None
