"""The fault-injection facility itself: off by default, refused in production, each fault does
exactly what it says at its own point and nothing elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks import faults
from tasks.faults import FaultPlan, SimulatedFault
from tests.integration.harness import REPO


def test_off_by_default_and_no_plan_without_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.wiring import fault_plan
    from workers.settings import Settings

    for name in ("KILL_AFTER_COMMIT", "CRASH_ON_TASK_FOR_EXTERNAL_ID", "OOM_ABOVE_BATCH", "SLEEP_IN_MODEL_S",
                 "SLEEP_BEFORE_PERSIST_COMMIT_S", "TRACE"):
        monkeypatch.delenv(f"ENRICH_FAULTS__{name}", raising=False)
    assert fault_plan(Settings()) is None
    assert not FaultPlan().active
    faults.hit("model.batch", size=100)  # no runtime installed here: a no-op


def test_settings_build_the_plan_and_production_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from workers.wiring import fault_plan
    from workers.settings import Settings

    monkeypatch.setenv("ENRICH_FAULTS__OOM_ABOVE_BATCH", "2")
    monkeypatch.setenv("ENRICH_FAULTS__KILL_AFTER_COMMIT", "persist")
    plan = fault_plan(Settings())
    assert plan == FaultPlan(kill_after_commit="persist", oom_above_batch=2)
    monkeypatch.setenv("ENRICH_ENV", "production")
    with pytest.raises(ValidationError, match="fault injection"):
        Settings()
    monkeypatch.setenv("ENRICH_ENV", "development")
    monkeypatch.setenv("ENRICH_FAULTS__KILL_AFTER_COMMIT", "everything")
    with pytest.raises(ValidationError):
        Settings()


def test_simulated_oom_only_above_the_limit_and_recognised_as_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from models.batch import is_oom as _is_oom
    from workers.settings import Settings
    from workers.wiring import fault_plan

    monkeypatch.setenv("ENRICH_FAULTS__OOM_ABOVE_BATCH", "2")
    plan = fault_plan(Settings())  # as the worker builds it: a real torch OOM
    plan.apply("model.batch", {"size": 2, "job_ids": [1, 2]})
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        plan.apply("model.batch", {"size": 3, "job_ids": [1, 2, 3]})
    assert _is_oom(caught.value)
    with pytest.raises(faults.SimulatedOutOfMemory) as plain:  # without torch at hand
        FaultPlan(oom_above_batch=2).apply("model.batch", {"size": 3, "job_ids": [1, 2, 3]})
    assert _is_oom(plain.value)
    with pytest.raises(SimulatedFault):
        plan.apply("no.such.point", {})


def _apply_in_child(plan: str, point: str, ctx: str) -> int:
    code = f"from tasks.faults import FaultPlan; FaultPlan({plan}).apply({point!r}, {ctx}); print('survived')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60).returncode


def test_kills_are_sigkill_and_only_at_their_point() -> None:
    assert _apply_in_child("kill_after_commit='persist'", "stage.committed", "{'stage': 'persist'}") == -9
    assert _apply_in_child("kill_after_commit='persist'", "stage.committed", "{'stage': 'fetch'}") == 0
    assert _apply_in_child("crash_on_task_for_external_id='p1'", "fetch.claimed", "{'external_id': 'p1'}") == -9
    assert _apply_in_child("crash_on_task_for_external_id='p1'", "fetch.claimed", "{'external_id': 'p2'}") == 0
