"""The AMQP topology: exchanges, queues, bindings and their arguments, built from settings.

This module is the source of truth; ``infra/rabbitmq/definitions.json`` is generated from it
(``enrich topology --definitions``) and a test keeps the two identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kombu import Exchange, Queue, binding

from workers.settings import Settings


class TaskQueue(StrEnum):
    cpu = "cpu"  # fetch + dedup, persist, outbox relay, retrain fan-out
    gpu = "gpu"  # ground → describe → embed, micro-batched


@dataclass(frozen=True)
class Topology:
    namespace: str
    events: Exchange
    tasks: Exchange
    dead_letter: Exchange
    product_events: Queue
    review_events: Queue
    listing_events: Queue
    cpu: Queue
    gpu: Queue
    dead_letters: Queue

    @property
    def task_queues(self) -> list[Queue]:
        return [self.cpu, self.gpu]

    @property
    def all_queues(self) -> list[Queue]:
        return [self.product_events, self.review_events, self.listing_events, self.cpu, self.gpu, self.dead_letters]

    def task_queue(self, which: TaskQueue) -> Queue:
        return self.cpu if which is TaskQueue.cpu else self.gpu


def queue_arguments(settings: Settings, *, rabbitmq: bool, dead_letter_exchange: str | None) -> dict[str, Any]:
    if not rabbitmq:
        return {}  # virtual transports (Redis, SQS, embedded) ignore x-arguments
    args: dict[str, Any] = {}
    if settings.broker.quorum_queues:
        args["x-queue-type"] = "quorum"
        args["x-delivery-limit"] = settings.broker.delivery_limit
    if dead_letter_exchange:
        args["x-dead-letter-exchange"] = dead_letter_exchange
    return args


def build_topology(settings: Settings, *, rabbitmq: bool) -> Topology:
    ns = settings.broker.namespace
    events = Exchange(f"{ns}.events", type="topic", durable=True)
    tasks = Exchange(f"{ns}.tasks", type="topic", durable=True)
    dlx = Exchange(f"{ns}.dlx", type="topic", durable=True)
    args = queue_arguments(settings, rabbitmq=rabbitmq, dead_letter_exchange=dlx.name)
    plain = queue_arguments(settings, rabbitmq=rabbitmq, dead_letter_exchange=None)

    def q(name: str, bindings: list[binding], arguments: dict[str, Any]) -> Queue:
        return Queue(f"{ns}.{name}", bindings=bindings, durable=True, queue_arguments=arguments or None)

    def task_q(which: TaskQueue) -> Queue:
        # A single exchange + routing key (not a bindings list): Celery's native delayed delivery
        # (retries with countdown on quorum queues) reads queue.exchange and queue.routing_key.
        return Queue(f"{ns}.{which.value}", exchange=tasks, routing_key=which.value, durable=True,
                     queue_arguments=args or None)

    return Topology(
        namespace=ns, events=events, tasks=tasks, dead_letter=dlx,
        product_events=q("product-events", [binding(events, routing_key="product.created"),
                                            binding(events, routing_key="product.updated")], args),
        # Merchant reviews: of listings, and of duplicate pairs (the intake dispatches on the key).
        review_events=q("review-events", [binding(events, routing_key="listing.reviewed"),
                                          binding(events, routing_key="duplicate.reviewed")], args),
        listing_events=q("listing-events", [binding(events, routing_key="listing.enriched"),
                                            binding(events, routing_key="listing.failed"),
                                            binding(events, routing_key="product.indexed")], plain),
        cpu=task_q(TaskQueue.cpu),
        gpu=task_q(TaskQueue.gpu),
        dead_letters=q("dead-letters", [binding(dlx, routing_key="#")], plain),
    )


def rabbitmq_definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (importable with `rabbitmqctl import_definitions`)."""
    exchanges = [
        {"name": e.name, "vhost": vhost, "type": e.type, "durable": True, "auto_delete": False,
         "internal": False, "arguments": {}}
        for e in (topology.events, topology.tasks, topology.dead_letter)
    ]
    queues, bindings = [], []
    for queue in topology.all_queues:
        queues.append({"name": queue.name, "vhost": vhost, "durable": True, "auto_delete": False,
                       "arguments": dict(queue.queue_arguments or {})})
        for source, key in queue_bindings(queue):
            bindings.append({"source": source, "vhost": vhost, "destination": queue.name,
                             "destination_type": "queue", "routing_key": key, "arguments": {}})
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def queue_bindings(queue: Queue) -> list[tuple[str, str]]:
    """(exchange, routing key) pairs of a queue, whichever way it was defined."""
    if queue.bindings:
        return sorted((b.exchange.name, b.routing_key) for b in queue.bindings)
    return [(queue.exchange.name, queue.routing_key)] if queue.exchange is not None else []


def declare(connection, topology: Topology) -> None:  # noqa: ANN001
    """Declare every exchange, queue and binding (idempotent). Publishers call it too: on virtual
    transports bindings live in the declaring process."""
    channel = connection.default_channel
    for exchange in (topology.events, topology.tasks, topology.dead_letter):
        exchange(channel).declare()
    for queue in topology.all_queues:
        queue(channel).declare()
