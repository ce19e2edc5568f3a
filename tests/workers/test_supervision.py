"""A worker that can no longer serve (a hung model thread) leaves so its supervisor restarts it."""

from __future__ import annotations

import time

import pytest


def test_exit_for_restart_stops_the_worker_warm_with_a_failure_code_then_forces_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.exceptions import WorkerShutdown
    from celery.worker import state

    from workers import supervision

    exits: list[int] = []
    monkeypatch.setattr(supervision, "_requested", None)
    monkeypatch.setattr(supervision.os, "_exit", exits.append)
    monkeypatch.setattr(state, "should_stop", None)
    supervision.exit_for_restart("test: hung model thread", grace_s=0.1)
    supervision.exit_for_restart("asked twice", grace_s=0.1)  # one shutdown, however often it is asked
    assert state.should_stop == supervision.EXIT_FOR_RESTART == 70  # Celery's consumer stops warm with it
    assert supervision.requested_exit_code() == 70
    with pytest.raises(WorkerShutdown) as stopping:
        state.maybe_shutdown()
    assert stopping.value.args[0] == 70
    time.sleep(0.4)
    assert exits == [70]  # the warm shutdown did not finish in time: forced


def test_the_gpu_runtime_restarts_the_worker_when_a_batch_outlives_the_hard_time_limit(monkeypatch: pytest.MonkeyPatch,
                                                                                       tmp_path) -> None:  # noqa: ANN001
    from workers import supervision, wiring
    from workers.settings import Settings

    asked: list[str] = []
    monkeypatch.setattr(supervision, "exit_for_restart", lambda reason, **_: asked.append(reason))
    monkeypatch.setattr("workers.database.get_session_factory", lambda: None)
    settings = Settings(data_dir=tmp_path, workers={"soft_time_limit_s": 300, "time_limit_s": 400, "heartbeat_s": 20,
                                 "retry_backoff_max_s": 30})
    runtime = wiring.build_runtime(settings)
    assert (runtime.model_wait_s, runtime.batch_hang_s) == (300.0, 400.0)
    assert (runtime.heartbeat_s, runtime.stall_after_s, runtime.queued_stall_after_s) == (20, 60.0, 86400)
    assert runtime.on_batcher_hung is not None
    runtime.on_batcher_hung()
    assert len(asked) == 1 and "hard time limit" in asked[0]
