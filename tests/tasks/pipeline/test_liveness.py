"""Liveness of a running stage: its claim's heartbeat, and the model stage's bounded batcher wait."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import pytest
from celery.exceptions import Retry

from db.enums import Stage
from tasks import adapter
from tasks.errors import ErrorCode, PipelineError
from tasks.pipeline import jobs
from tasks.runtime import Runtime, install_runtime


def _runtime(**overrides: Any) -> Runtime:
    return Runtime(session_factory=None, blobs=None, fetcher=None, publisher=None, image_limits=None,  # type: ignore[arg-type]
                   models_factory=None, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def beats(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Stage, str]]:
    """Every heartbeat a stage sends (job, stage, task id); the first one meets a database blip."""
    sent: list[tuple[int, Stage, str]] = []

    @contextmanager
    def fake_job_session(factory: Any, job_id: int):  # noqa: ANN202
        yield object()

    def fake_heartbeat(session: Any, job_id: int, stage: Stage, task_id: str) -> bool:
        sent.append((job_id, stage, task_id))
        if len(sent) == 1:
            raise RuntimeError("server closed the connection unexpectedly")
        return True

    monkeypatch.setattr(adapter, "job_session", fake_job_session)
    monkeypatch.setattr(jobs, "heartbeat", fake_heartbeat)
    return sent


def test_a_running_stage_beats_its_claim_until_it_ends_and_a_failed_beat_is_harmless(beats) -> None:  # noqa: ANN001
    with adapter.ClaimHeartbeat(_runtime(heartbeat_s=0.05), 7, Stage.model, "task-1") as hb:
        time.sleep(0.4)
    sent = len(beats)
    assert sent >= 3 and set(beats) == {(7, Stage.model, "task-1")}
    assert hb.beats == sent - 1  # the blip was logged and skipped; the next beats went through
    time.sleep(0.2)
    assert len(beats) == sent  # stopped with the stage


def test_stage_tasks_run_their_stage_under_a_heartbeat(beats, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    import tasks.pipeline.tasks as stage_tasks

    def slow_fetch(runtime: Runtime, job_id: int, task_id: str) -> Any:
        time.sleep(0.35)
        return SimpleNamespace(next_stage=None)

    monkeypatch.setattr(stage_tasks, "fetch_and_dedup", slow_fetch)
    monkeypatch.setattr(adapter, "relay_outbox", lambda runtime: None)
    install_runtime(_runtime(heartbeat_s=0.05))
    stage_tasks.fetch.push_request(id="task-f", retries=0)
    try:
        stage_tasks.fetch.run(11)
    finally:
        stage_tasks.fetch.pop_request()
        install_runtime(None)
    assert len(beats) >= 3 and set(beats) == {(11, Stage.fetch, "task-f")}
    settled = len(beats)
    time.sleep(0.15)
    assert len(beats) == settled


def test_a_batcher_that_gives_no_result_in_time_is_a_retryable_stage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.batch import BatcherHung, BatchWaitTimeout

    install_runtime(_runtime())
    try:
        for error in (BatchWaitTimeout("no model result within 600 s"), BatcherHung("model thread hung")):
            retried: dict[str, Any] = {}

            def retry(**kwargs: Any) -> Retry:
                retried.update(kwargs)
                return Retry()

            task = type("FakeTask", (), {"request": type("Req", (), {"retries": 0})(), "retry": staticmethod(retry)})()

            def stage(runtime: Runtime, error: Exception = error) -> None:
                raise error

            with pytest.raises(Retry):
                adapter.run_job_stage(task, 3, stage)  # type: ignore[arg-type]
            exc = retried["exc"]
            assert isinstance(exc, PipelineError) and exc.retryable and exc.code is ErrorCode.internal_error
            assert str(error) in exc.detail
    finally:
        install_runtime(None)
