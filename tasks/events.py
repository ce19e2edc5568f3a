"""Domain events on the wire: parsing and validating what comes in, building what goes out.

Incoming bytes are never handed to a generic deserializer: only ``application/json`` (UTF-8) is
parsed, so a pickled or otherwise foreign message is refused without being decoded.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from tasks.errors import ErrorCode, PipelineError

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 1_000_000
IN_TYPES = ("product.created", "product.updated", "listing.reviewed", "duplicate.reviewed")
OUT_TYPES = ("listing.enriched", "listing.failed", "product.indexed")  # product.indexed: policy without a listing
ACCEPTED_CONTENT_TYPES = {"application/json", "application/json; charset=utf-8"}


# Each event type's contract versions (``tasks/contracts/<type>.v<N>.schema.json``); the last is the
# current one. listing.enriched v2 adds the truth flags (forced fields, conflicts, text checks).
CONTRACT_VERSIONS: dict[str, tuple[int, ...]] = {"listing.enriched": (1, 2)}


def contract_versions(event_type: str) -> tuple[int, ...]:
    return CONTRACT_VERSIONS.get(event_type, (SCHEMA_VERSION,))


@cache
def contract(event_type: str, version: int | None = None) -> dict[str, Any]:
    """The JSON Schema of ``event_type`` at ``version`` (default: its current version)."""
    version = contract_versions(event_type)[-1] if version is None else version
    text = resources.files("tasks.contracts").joinpath(f"{event_type}.v{version}.schema.json").read_text()
    return json.loads(text)


@cache
def _validator(event_type: str, version: int | None = None) -> Draft202012Validator:
    return Draft202012Validator(contract(event_type, version), format_checker=FormatChecker())


class InvalidEvent(PipelineError):
    def __init__(self, detail: str, *, event_id: uuid.UUID | None = None, raw: dict[str, Any] | None = None):
        super().__init__(ErrorCode.invalid_event, detail)
        self.event_id = event_id
        self.raw = raw or {}


@dataclass(frozen=True)
class ProductImageRef:
    url: str
    role: str


@dataclass(frozen=True)
class ProductEvent:
    event_id: uuid.UUID
    event_type: str
    occurred_at: str
    tenant_id: str
    merchant_id: str
    external_id: str
    version: int
    category: str
    title: str
    description: str
    attributes: dict[str, Any]
    images: tuple[ProductImageRef, ...]
    locale: str
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # hints.stages (tasks.pipeline.policy): the stages the publisher asks for; None: whatever is configured
    stages_hint: tuple[str, ...] | None = None


def _no_nul(value: Any, path: str = "$") -> None:
    """PostgreSQL text cannot hold NUL; such input is refused as invalid rather than mangled."""
    if isinstance(value, str) and "\x00" in value:
        raise InvalidEvent(f"{path}: NUL character not allowed")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k, path)
            _no_nul(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_nul(v, f"{path}[{i}]")


def decode_json(body: bytes, content_type: str | None) -> dict[str, Any]:
    if (content_type or "").lower().replace(" ", "") not in {c.replace(" ", "") for c in ACCEPTED_CONTENT_TYPES}:
        raise InvalidEvent(f"content type {content_type!r} refused: domain events are application/json")
    if len(body) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise InvalidEvent("event must be a JSON object")
    return obj


def _event_id_of(obj: dict[str, Any]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(obj.get("event_id")))
    except ValueError:
        return None


def validate(obj: dict[str, Any], event_type: str) -> None:
    """Against the contract version the event names (``schema_version``), when there is one."""
    named = obj.get("schema_version") if isinstance(obj, dict) else None
    version = named if isinstance(named, int) and named in contract_versions(event_type) else None
    errors = sorted(_validator(event_type, version).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        message = err.message if len(err.message) < 300 else err.message[:300] + "…"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidEvent(f"{where}: {message}{more}", event_id=_event_id_of(obj), raw=obj)
    try:
        _no_nul(obj)
    except InvalidEvent as exc:
        raise InvalidEvent(exc.detail, event_id=_event_id_of(obj), raw=obj) from None


def parse_product_event(body: bytes, content_type: str | None, routing_key: str) -> ProductEvent:
    obj = decode_json(body, content_type)
    event_type = obj.get("event_type") if obj.get("event_type") in ("product.created", "product.updated") else routing_key
    if event_type not in ("product.created", "product.updated"):
        raise InvalidEvent(f"unexpected event type {event_type!r} on the product events queue",
                           event_id=_event_id_of(obj), raw=obj)
    validate(obj, event_type)
    p = obj["product"]
    hint = (obj.get("hints") or {}).get("stages")
    if hint is not None:
        from tasks.pipeline.policy import InvalidPolicy, check_stages

        try:
            check_stages(hint)
        except InvalidPolicy as exc:
            raise InvalidEvent(f"$.hints.stages: {exc}", event_id=_event_id_of(obj), raw=obj) from None
    return ProductEvent(
        event_id=uuid.UUID(obj["event_id"]), event_type=event_type, occurred_at=obj["occurred_at"],
        tenant_id=obj["tenant_id"], merchant_id=obj["merchant_id"], external_id=p["external_id"],
        version=p["version"], category=p["category"], title=p.get("title", ""),
        description=p.get("description", ""), attributes=p.get("attributes", {}),
        images=tuple(ProductImageRef(i["url"], i.get("role", "alternate")) for i in p["images"]),
        locale=p.get("locale", "en"), raw=obj, stages_hint=tuple(hint) if hint is not None else None,
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def failed_event(*, causation_id: uuid.UUID, code: ErrorCode, detail: str, retryable: bool,
                 tenant_id: str | None, merchant_id: str | None, external_id: str | None,
                 version: int | None) -> dict[str, Any]:
    product = None
    if external_id is not None:  # version is optional in the contract: left out when unknown
        product = {"external_id": external_id} | ({"version": version} if version is not None else {})
    payload = {
        "schema_version": SCHEMA_VERSION, "event_id": str(uuid.uuid4()), "event_type": "listing.failed",
        "causation_id": str(causation_id), "occurred_at": now_iso(), "tenant_id": tenant_id,
        "merchant_id": merchant_id, "product": product, "code": code.value,
        "detail": detail[:2000], "retryable": retryable,
    }
    validate(payload, "listing.failed")
    return payload


def product_event_payload(*, event_id: uuid.UUID | None = None, event_type: str = "product.created",
                          tenant_id: str, merchant_id: str, external_id: str, version: int, category: str,
                          image_urls: list[str], title: str = "", description: str = "",
                          attributes: dict[str, Any] | None = None, locale: str = "en",
                          stages: list[str] | None = None) -> dict[str, Any]:
    """Build a valid product event (used by `enrich publish`, the demo and the tests)."""
    payload = {
        "schema_version": SCHEMA_VERSION, "event_id": str(event_id or uuid.uuid4()), "event_type": event_type,
        "occurred_at": now_iso(), "tenant_id": tenant_id, "merchant_id": merchant_id,
        "product": {
            "external_id": external_id, "version": version, "category": category, "title": title,
            "description": description, "attributes": attributes or {},
            "images": [{"url": u, "role": "primary" if i == 0 else "alternate"} for i, u in enumerate(image_urls)],
            "locale": locale,
        },
    }
    if stages is not None:
        payload["hints"] = {"stages": list(stages)}
    validate(payload, event_type)
    return payload
