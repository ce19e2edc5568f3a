"""The metric hooks record what they say, only after commit, and a worker process tree serves its
prefork children's metrics from one port (prometheus_client's multiprocess mode, real forks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from prometheus_client import REGISTRY
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from models.batch import MicroBatcher
from tasks import metrics
from tests.integration.harness import free_port
from workers.metrics import management_url, role_of
from workers.settings import MetricsSettings

REPO = Path(__file__).resolve().parents[2]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_intake_outcomes_are_counted_by_kind_and_code() -> None:
    before = (sample("catalog_events_received_total", kind="product"),
              sample("catalog_events_accepted_total", kind="product"),
              sample("catalog_events_refused_total", kind="product", code="stale_version"))
    metrics.event_received("product")
    metrics.event_received("product")
    metrics.event_outcome("product", "accepted")
    metrics.event_outcome("product", "refused", "stale_version")
    after = (sample("catalog_events_received_total", kind="product"),
             sample("catalog_events_accepted_total", kind="product"),
             sample("catalog_events_refused_total", kind="product", code="stale_version"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]


def test_job_counts_and_stage_timings_move_only_when_the_transaction_commits() -> None:
    engine = create_engine("sqlite://")
    done = lambda: sample("catalog_jobs_finished_total", outcome="done", code="")  # noqa: E731
    ground = lambda: sample("catalog_stage_duration_seconds_count", stage="ground")  # noqa: E731
    start_done, start_ground = done(), ground()
    with Session(engine) as session:
        session.begin()
        metrics.job_finished(session, "done")
        metrics.stage_timings(session, {"ground": 120.0, "not_a_stage": 5.0})
        session.rollback()
    assert (done(), ground()) == (start_done, start_ground)
    with Session(engine) as session:
        session.begin()
        metrics.job_finished(session, "done")
        metrics.stage_timings(session, {"ground": 120.0, "describe": 800.0})
        assert done() == start_done  # not yet: still inside the transaction
        session.commit()
    assert (done(), ground()) == (start_done + 1, start_ground + 1)
    assert sample("catalog_stage_duration_seconds_bucket", stage="ground", le="0.25") >= 1
    assert REGISTRY.get_sample_value("catalog_stage_duration_seconds_count", {"stage": "not_a_stage"}) is None


def test_micro_batcher_reports_each_batch_size_and_fill_wait() -> None:
    seen: list[tuple[int, float]] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        gate.wait(2)
        return [i * 2 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=3, max_wait_ms=150,
                                                   on_batch=lambda n, w: seen.append((n, w)))
    futures = [batcher.submit(i) for i in range(3)]
    gate.set()
    assert [f.result(5) for f in futures] == [0, 2, 4]
    batcher.close()
    assert [n for n, _ in seen] == [3]
    assert 0 <= seen[0][1] < 0.15  # the batch filled before its deadline


def test_ports_and_roles() -> None:
    assert [role_of(q) for q in (["events"], ["events", "cpu"], ["gpu"], ["cpu", "gpu"])] == \
        ["events", "cpu", "gpu", "gpu"]
    assert [MetricsSettings(port=9000).port_for(r) for r in ("events", "cpu", "gpu", "beat")] == \
        [9000, 9001, 9002, 9003]
    assert management_url("amqp://u:p%40ss@rabbit.internal:5672/catalog") == \
        "http://u:p%40ss@rabbit.internal:15672/#catalog"
    assert management_url("amqp://guest:guest@127.0.0.1:5672/%2F").endswith(":15672/#/")


PARENT = textwrap.dedent("""
    import os, sys, urllib.request
    from workers.settings import Settings
    from workers import metrics as endpoint
    from tasks import metrics

    port = endpoint.start(Settings(), "cpu")
    for _ in range(2):  # two prefork-like children, each with its own metric files
        pid = os.fork()
        if pid == 0:
            metrics.event_received("review")
            metrics.task_ran("fetch", 0.3)
            os._exit(0)
        os.waitpid(pid, 0)
        endpoint.child_exited(pid)
    print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
""")


def test_a_process_tree_serves_its_childrens_metrics_from_a_clean_directory(tmp_path: Path) -> None:
    base = free_port()
    stale = tmp_path / "metrics" / f"cpu-{base + 1}"
    stale.mkdir(parents=True)
    (stale / "counter_999999.db").write_bytes(b"left over from the previous run")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "ENRICH_DATA_DIR": str(tmp_path),
           "ENRICH_METRICS__ENABLED": "true", "ENRICH_METRICS__PORT": str(base),
           "ENRICH_METRICS__HOST": "127.0.0.1"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", PARENT], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert 'catalog_events_received_total{kind="review"} 2.0' in lines
    assert 'catalog_stage_task_duration_seconds_count{stage="fetch"} 2.0' in lines
    assert 'catalog_stage_task_duration_seconds_bucket{le="0.5",stage="fetch"} 2.0' in lines
    assert not (stale / "counter_999999.db").exists()
    assert time.monotonic() - started < 60
