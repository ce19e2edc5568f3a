"""Processes that never run a model never load the ML stack: the events and CPU workers and beat.

Measured from outside before the renovation, an idle events+cpu worker held about 2.2 GB and beat
about 1.1 GB, almost all of it torch, transformers and xgrammar (``infra/bench/idle_rss.py``).
This imports what those processes import at start, in a fresh interpreter, and builds the task
runtime the way a worker child does after fork.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "xgrammar", "open_clip", "torchvision", "peft", "trl")

PROBE = f"""
import json, sys
import workers.cli                                    # `enrich worker` / `enrich beat` entry point
from workers.celery_app import app, send_task
app.loader.import_default_modules()                   # every task module, as a worker imports at start
import workers.intake, workers.worker_main, workers.status
from workers.settings import get_settings
from workers.wiring import build_runtime
runtime = build_runtime(get_settings(), send_task)    # what a prefork child builds after fork
assert sorted(app.tasks.keys() & {{"catalog.fetch", "catalog.model", "catalog.persist"}}) == \\
    ["catalog.fetch", "catalog.model", "catalog.persist"]
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_events_cpu_workers_and_beat_import_no_ml_stack(tmp_path: Path) -> None:
    env = {**os.environ, "ENRICH_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO),
           "ENRICH_DB__URL": "postgresql://nobody@127.0.0.1:1/never",  # built, never connected
           "ENRICH_BROKER__URL": "amqp://guest:guest@127.0.0.1:1//"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_probe_sees_an_ml_import(tmp_path: Path) -> None:
    """The same probe reports torch once something imports it (so an empty answer means something)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = f"import sys, json, models.devices; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "torch" in json.loads(done.stdout.strip().splitlines()[-1])
