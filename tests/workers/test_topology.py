"""The RabbitMQ definitions file in infra/ is exactly what the code declares."""

from __future__ import annotations

import json
from pathlib import Path

from workers.settings import Settings
from workers.topology import build_topology, rabbitmq_definitions

DEFINITIONS = Path(__file__).resolve().parents[2] / "infra" / "rabbitmq" / "definitions.json"


def test_definitions_file_matches_code() -> None:
    expected = rabbitmq_definitions(build_topology(Settings(), rabbitmq=True))
    assert json.loads(DEFINITIONS.read_text()) == expected, (
        "infra/rabbitmq/definitions.json is stale: regenerate with `enrich topology --definitions`")


def test_work_queues_are_quorum_with_dead_lettering_and_delivery_limit() -> None:
    topo = build_topology(Settings(), rabbitmq=True)
    for q in (topo.product_events, topo.review_events, topo.cpu, topo.gpu):
        args = q.queue_arguments
        assert args["x-queue-type"] == "quorum" and args["x-dead-letter-exchange"] == "catalog.dlx"
        assert args["x-delivery-limit"] == Settings().broker.delivery_limit
    assert {b.routing_key for b in topo.product_events.bindings} == {"product.created", "product.updated"}
    assert topo.events.type == "topic" and topo.tasks.type == "topic"  # topic: native delayed delivery


def test_virtual_transports_get_no_rabbitmq_arguments() -> None:
    topo = build_topology(Settings(), rabbitmq=False)
    assert all(not q.queue_arguments for q in topo.all_queues)
