"""`enrich publish`, `enrich status` and `enrich embeddings list` against a running deployment, as an
operator runs them: the workers as ``enrich_worker``, the maintenance commands as ``enrich_admin``
(both under forced row-level security)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.integration.harness import REPO, Deployment

pytestmark = pytest.mark.integration


def enrich(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", *args], cwd=REPO, env=dep.env,
                          capture_output=True, text=True, timeout=120)


def test_publish_from_a_manifest_then_status(deployment: Deployment, dataset_dir: Path, tmp_path: Path, engine) -> None:  # noqa: ANN001
    manifest = tmp_path / "few.csv"
    lines = (dataset_dir / "manifest.csv").read_text().splitlines()
    rows = [ln for ln in lines[1:] if ",validation," in ln][:3]
    manifest.write_text("\n".join([lines[0], *[str(dataset_dir) + "/" + r for r in rows]]) + "\n")
    res = enrich(deployment, "publish", str(manifest), "--tenant", "cli-tenant", "--limit", "3")
    assert res.returncode == 0, res.stderr
    assert "published 3 product events" in res.stdout
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM enrichment_jobs WHERE tenant_id='cli-tenant' "
                                     "AND status IN ('done','failed')")).scalar()
        if done == 3:
            break
        time.sleep(0.5)
    assert done == 3, deployment.logs()
    status = enrich(deployment, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    with engine.connect() as conn:  # the superuser's count, which row-level security does not filter
        jobs = conn.execute(text("SELECT count(*) FROM enrichment_jobs")).scalar_one()
        clip_rows = conn.execute(text("SELECT count(*) FROM embeddings e JOIN model_versions mv "
                                      "ON mv.id = e.model_version_id WHERE mv.status = 'active'")).scalar_one()
    assert sum(report["jobs_by_status"].values()) == jobs and report["coverage"]["products"] >= 3
    assert report["jobs_by_status"].get("done", 0) >= 3
    assert report["throughput_15min"]["done"] >= 3 and report["throughput_15min"]["events_per_s"] > 0
    assert report["outbox_pending"] == 0
    human = enrich(deployment, "status")
    assert "jobs by status" in human.stdout and "failures by code" in human.stdout
    versions = enrich(deployment, "embeddings", "list")
    assert versions.returncode == 0, versions.stderr
    active = [line.split() for line in versions.stdout.splitlines() if " active " in line]
    assert len(active) == 1 and int(active[0][3]) == clip_rows > 0, versions.stdout


def test_publish_refuses_a_folder_without_photos(deployment: Deployment, tmp_path: Path) -> None:
    res = enrich(deployment, "publish", str(tmp_path))
    assert res.returncode == 2 and "no photos found" in res.stderr and "Traceback" not in res.stderr
