"""Which broker this process talks to: the configured one, or an embedded kombu virtual transport."""

from __future__ import annotations

from workers.settings import Settings, get_settings


def broker_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.broker.url:
        return settings.broker.url
    path = settings.data_dir / "broker.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqla+sqlite:///{path}"


def broker_kind(url: str) -> str:
    scheme = url.split("://", 1)[0].lower()
    if scheme in {"amqp", "amqps", "pyamqp"}:
        return "rabbitmq"
    if scheme in {"redis", "rediss"}:
        return "redis"
    if scheme == "sqs":
        return "sqs"
    return "embedded"
