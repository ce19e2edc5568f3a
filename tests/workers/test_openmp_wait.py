"""Worker processes ask OpenMP to wait passively, before torch loads, unless the operator said otherwise.

Spinning OpenMP threads on cores shared with the events/CPU worker's children burn the core the
thread they wait for needs (measured with infra/bench/bench_embeddings_only.py: the model worker's
CPU per photo 135 ms spinning against 93 ms passive). The setting must be in the environment before
libgomp is loaded, so it is made where every entry point starts: importing ``workers``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = "import os, workers.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**base, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_workers_default_to_passive_openmp_waits() -> None:
    assert _policy() == "PASSIVE"


def test_an_explicit_setting_wins() -> None:
    assert _policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
