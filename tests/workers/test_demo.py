"""The README's first command: the main job on embedded defaults, end to end, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end_on_embedded_defaults(tmp_path: Path, dataset_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    env.update({"ENRICH_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    res = subprocess.run([sys.executable, "-m", "workers", "demo", "--limit", "5", "--timeout", "400"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "embedded PostgreSQL+pgvector" in out and "embedded SQLite broker" in out
    assert "RANDOM WEIGHTS" in out  # never presented as meaningful
    assert "5/5 finished" in out
    assert "Enriched listings" in out and "exact of dress-1" in out  # the identical re-listing
    assert "catalog.similar_products('demo', 'dress-1'" in out
    assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()
    report = tmp_path / "data" / "reports" / "report-demo.html"
    assert f"{report}" in out.replace("\n", "") and report.stat().st_size > 10_000  # the page it printed
