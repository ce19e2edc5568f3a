"""The `enrich` command as a user runs it: a real subprocess, a real embedded database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENRICH = [sys.executable, "-m", "workers"]


def run(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    full_env.update({"ENRICH_DATA_DIR": str(data_dir), "ENRICH_MODELS__PROFILE": "tiny", **env})
    return subprocess.run([*ENRICH, *args], capture_output=True, text=True, env=full_env, timeout=180)


def test_db_upgrade_twice_on_the_embedded_default(tmp_path: Path) -> None:
    first = run(["db", "upgrade"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "was empty" in first.stdout
    second = run(["db", "upgrade"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(was 0" in second.stdout  # already at head: nothing applied
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()


def test_unreachable_database_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    res = run(["db", "upgrade"], tmp_path, ENRICH_DB__URL="postgresql://nobody@127.0.0.1:1/x")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "ENRICH_DB__URL" in err[0]
    assert "Traceback" not in res.stderr


def test_database_without_pgvector_names_the_setting(tmp_path: Path) -> None:
    # The machine's system PostgreSQL has no pgvector: exactly the case to report.
    res = run(["db", "upgrade"], tmp_path, ENRICH_DB__URL="postgresql://postgres@127.0.0.1:5432/postgres")
    if "unreachable" in res.stderr:
        import pytest

        pytest.skip("no system PostgreSQL on 127.0.0.1:5432 to demonstrate a server without pgvector")
    assert res.returncode == 2
    assert "pgvector" in res.stderr and "ENRICH_DB__URL" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_setting_value_is_one_line(tmp_path: Path) -> None:
    res = run(["db", "url"], tmp_path, ENRICH_MODELS__PROFILE="huge")
    assert res.returncode == 2
    assert "ENRICH_MODELS__PROFILE" in res.stderr and "Traceback" not in res.stderr


def test_doctor_reports_truthfully(tmp_path: Path) -> None:
    res = run(["doctor"], tmp_path)
    out = res.stdout
    assert "database" in out and "PostgreSQL 18" in out
    assert "migrations" in out and "run `enrich db upgrade`" in out  # fresh data dir: not migrated yet
    assert res.returncode == 1  # something is failing, and it says so
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    res = run(["doctor"], tmp_path)
    assert "[ ok ] migrations" in res.stdout, res.stdout
    assert "CUDA" in res.stdout and "tiny" in res.stdout
