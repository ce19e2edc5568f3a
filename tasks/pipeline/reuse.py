"""When a listing may be copied instead of generated: only when every input that decides it is the same.

A listing is a function of the image, the model versions, the category's schema and the merchant's
own text and attributes (which the listing model reads and which the listing carries as
``source: merchant``). The reuse key hashes the last two; the image and the model versions are
matched by the reuse query itself. So a re-listing of the same photo with the same text costs no
model work, while a ``product.updated`` with a new title, another product that shares the photo
with other attributes, or a category change is generated afresh. A listing the merchant rejected
is never copied, and a copy is always a new ``proposed`` listing with the content as generated.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from models.categories import resolve_schema
from models.errors import UnsupportedCategory

KEY_VERSION = "v1"


def reuse_key(*, category: str, title: str, description: str, attributes: dict[str, Any], locale: str,
              unknown_category: str = "generic") -> str | None:
    """The key of the inputs besides the image and the models; None when the category has no schema
    (that product cannot be enriched, so nothing can be reused for it)."""
    try:
        schema = resolve_schema(category, unknown=unknown_category)  # type: ignore[arg-type]
    except UnsupportedCategory:
        return None
    doc = {"schema": schema.schema_id, "title": title, "description": description, "attributes": attributes,
           "locale": locale}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{KEY_VERSION}:{digest}"


def with_photos(key: str | None, other_photos: list[str]) -> str | None:
    """The key extended by the SHA-256 of the product's other photos, in order (the primary is
    matched by the reuse query): a product with one photo keeps the key as it was."""
    if key is None or not other_photos:
        return key
    digest = hashlib.sha256("\x1f".join([key, *other_photos]).encode()).hexdigest()
    return f"{KEY_VERSION}:{digest}"
