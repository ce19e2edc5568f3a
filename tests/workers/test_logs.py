from __future__ import annotations

import json
import logging

import pytest

from workers.logs import bind_context, configure_logging, get_logger


def test_json_lines_carry_bound_context_including_stdlib_loggers(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True, level="INFO", force=True)
    try:
        with bind_context(event_id="e-1", tenant_id="t-1", product_id=None):
            get_logger("test").info("stage.done", took_ms=12)
            logging.getLogger("celery.worker").warning("from celery")
        get_logger("test").info("after")
        lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    finally:
        configure_logging(json=False, force=True)
    assert lines[0]["event"] == "stage.done" and lines[0]["event_id"] == "e-1" and lines[0]["took_ms"] == 12
    assert "product_id" not in lines[0]  # None values are not bound
    assert lines[1]["event"] == "from celery" and lines[1]["tenant_id"] == "t-1" and lines[1]["level"] == "warning"
    assert "event_id" not in lines[2]  # context left the block
