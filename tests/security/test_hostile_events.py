"""Hostile product events through real RabbitMQ and worker processes (running as enrich_worker).

Each hostile message must end as ``listing.failed`` / ``invalid_event`` with a detail that says
what is wrong, be dead-lettered by the broker (and kept in ``dead_letters`` by the dead-letter
consumer), and cost nothing to the valid events published in the same burst.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tasks.events import MAX_EVENT_BYTES, product_event_payload
from tests.integration.harness import Deployment
from tests.security.conftest import record_burst, tenant, wait_messages

pytestmark = pytest.mark.integration


class _Tripwire:
    """Unpickling this object creates ``path``: the file's absence proves nobody unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _body_event_id(body: bytes) -> uuid.UUID:
    """The id intake gives an event whose own id cannot be read (tasks.pipeline.intake.reject_invalid_event)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, "sha256:" + hashlib.sha256(body).hexdigest())


def _valid(t: str, ext: str, photo: tuple[Path, str]) -> dict[str, Any]:
    path, category = photo
    return product_event_payload(tenant_id=t, merchant_id="m1", external_id=ext, version=1, category=category,
                                 image_urls=[path.as_uri()], title=f"{category} {ext}",
                                 description="Photographed on a hanger.", attributes={"brand": "Acme"})


def test_hostile_events_are_refused_dead_lettered_and_cost_nothing_else(
        secure_deployment: Deployment, sample_photos, tmp_path: Path, engine) -> None:  # noqa: ANN001
    dep = secure_deployment
    t = tenant("events")
    marker = tmp_path / "unpickled.marker"
    # The payload is live: unpickling it here does create a file (so the check below can fail).
    probe = tmp_path / "probe.marker"
    pickle.loads(pickle.dumps(_Tripwire(probe))).close()
    assert probe.exists()

    base = _valid(t, "template", sample_photos[0])
    hostile: dict[str, tuple[bytes, str, str]] = {}  # name -> (body, content type, expected detail fragment)

    def add_json(name: str, payload: dict[str, Any], fragment: str) -> None:
        hostile[name] = (json.dumps(payload).encode(), "application/json", fragment)

    missing = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    del missing["product"]["category"]
    add_json("missing_field", missing, "'category' is a required property")
    no_tenant = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    del no_tenant["tenant_id"]
    add_json("missing_tenant", no_tenant, "'tenant_id' is a required property")
    wrong_type = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    wrong_type["product"]["version"] = "seven"
    add_json("wrong_type", wrong_type, "$.product.version: 'seven' is not of type 'integer'")
    wrong_images = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    wrong_images["product"]["images"] = {"url": "https://img.example/a.jpg"}
    add_json("wrong_type_images", wrong_images, "$.product.images")
    long_desc = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    long_desc["product"]["description"] = "x" * 25_000  # over the contract's 20,000, under the body cap
    add_json("description_over_contract", long_desc, "$.product.description")
    huge = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    huge["product"]["description"] = "y" * (10 * 1024 * 1024)
    add_json("description_10mb", huge, f"the limit is {MAX_EVENT_BYTES}")
    nul = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}
    nul["product"]["title"] = "dress\x00; DROP TABLE listings"
    add_json("nul_byte", nul, "$.product.title: NUL character not allowed")
    future = json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4()), "schema_version": 2}
    add_json("unknown_schema_version", future, "$.schema_version: 1 was expected")
    bad_utf8 = json.dumps(json.loads(json.dumps(base)) | {"event_id": str(uuid.uuid4())}).encode()
    bad_utf8 = bad_utf8.replace(b'"template"', b'"templ\xff\xfete"')
    hostile["invalid_utf8"] = (bad_utf8, "application/json", "body is not valid UTF-8")
    hostile["not_an_object"] = (b'["product.created"]', "application/json", "event must be a JSON object")
    hostile["pickle"] = (pickle.dumps({"event_id": str(uuid.uuid4()), "x": _Tripwire(marker)}),
                         "application/x-python-serialize", "content type 'application/x-python-serialize' refused")

    expected_ids: dict[str, uuid.UUID] = {}
    for name, (body, _ctype, _fragment) in hostile.items():
        try:
            obj = json.loads(body)
            expected_ids[name] = uuid.UUID(obj["event_id"]) if len(body) <= MAX_EVENT_BYTES else _body_event_id(body)
        except (ValueError, KeyError, TypeError):
            expected_ids[name] = _body_event_id(body)

    valid_ids: list[uuid.UUID] = []
    for n, (name, (body, ctype, _fragment)) in enumerate(hostile.items()):  # interleaved in one burst
        if n % 3 == 0:
            valid_ids.append(dep.publish(_valid(t, f"ok{n}", sample_photos[(n // 3) % len(sample_photos)])))
        dep.publish_raw(body, "product.created", content_type=ctype)
    valid_ids.append(dep.publish(_valid(t, "ok-last", sample_photos[5])))

    rows = dep.wait_finished([*valid_ids, *expected_ids.values()], timeout=240)
    msgs = wait_messages(dep, [str(i) for i in [*valid_ids, *expected_ids.values()]])
    record_burst("hostile events (interleaved with valid)", {i: rows[i] for i in valid_ids},
                 published=len(valid_ids) + len(hostile), rejected=len(hostile))

    assert {rows[i].status for i in valid_ids} == {"done"}, [(rows[i].status, rows[i].error_code) for i in valid_ids]
    assert all(msgs[str(i)]["event_type"] == "listing.enriched" for i in valid_ids)
    for name, (body, _ctype, fragment) in hostile.items():
        eid = expected_ids[name]
        assert rows[eid].inbox == "rejected" and rows[eid].job_id is None, name
        msg = msgs[str(eid)]
        assert msg["event_type"] == "listing.failed" and msg["code"] == "invalid_event", (name, msg)
        assert msg["retryable"] is False and fragment in msg["detail"], (name, msg["detail"])
    # Only the valid events produced rows beyond the inbox.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM listings WHERE tenant_id = :t"), {"t": t}).scalar() == len(valid_ids)
        assert conn.execute(text("SELECT count(*) FROM products WHERE tenant_id = :t AND external_id = 'template'"),
                            {"t": t}).scalar() == 0
    # Dead-lettered by the broker (reason 'rejected'), kept byte for byte by the dead-letter consumer.
    digests = {hashlib.sha256(body).hexdigest(): name for name, (body, _c, _f) in hostile.items()}
    import time

    deadline = time.monotonic() + 30
    kept: dict[str, str] = {}
    while time.monotonic() < deadline and len(kept) < len(digests):
        with engine.connect() as conn:
            kept = dict(conn.execute(text(
                "SELECT encode(sha256(body), 'hex'), reason FROM dead_letters"
                " WHERE queue = :q AND encode(sha256(body), 'hex') = ANY(:d)"),
                {"q": f"{dep.namespace}.product-events", "d": list(digests)}).all())
        time.sleep(0.5)
    assert {digests[d] for d in kept} == set(hostile), sorted(set(hostile) - {digests[d] for d in kept})
    assert set(kept.values()) == {"rejected"}
    # Never deserialized: not by intake, not by the dead-letter consumer.
    assert not marker.exists()
