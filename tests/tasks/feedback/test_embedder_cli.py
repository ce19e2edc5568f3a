"""The embedder loop's commands as an operator runs them: a real subprocess, a real embedded database."""

from __future__ import annotations

from pathlib import Path

from tests.workers.test_cli import run


def test_embedder_commands_on_an_empty_catalog(tmp_path: Path) -> None:
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    built = run(["retrain", "build-embedder-data"], tmp_path)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("empty: no dataset written")
    again = run(["retrain", "build-embedder-data"], tmp_path)  # converges: still nothing
    assert again.returncode == 0 and again.stdout.startswith("empty:")
    missing = run(["retrain", "embedder", "--dataset", "nope"], tmp_path)
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert missing.returncode == 2 and errors == ["error: no training dataset named 'nope'"], missing.stderr
    bad = run(["retrain", "embedder", "--dataset", "nope", "--trainable", "lora"], tmp_path)
    assert bad.returncode == 2 and "trainable must be one of" in bad.stderr and "Traceback" not in bad.stderr
    listed = run(["models", "list", "--kind", "clip"], tmp_path)
    assert listed.returncode == 0 and "no model versions registered" in listed.stdout


def test_beat_schedules_the_embedder_only_when_asked(monkeypatch) -> None:  # noqa: ANN001
    from workers.celery_app import celery_config
    from workers.settings import Settings

    assert "retrain-finetune-embedder" not in celery_config(Settings())["beat_schedule"]
    monkeypatch.setenv("ENRICH_WORKERS__EMBEDDER_RETRAIN_INTERVAL_S", "3600")
    monkeypatch.setenv("ENRICH_WORKERS__EMBEDDER_RETRAIN_MIN_ROWS", "10")
    entry = celery_config(Settings())["beat_schedule"]["retrain-finetune-embedder"]
    assert entry["task"] == "catalog.retrain.finetune_embedder" and entry["schedule"].run_every.total_seconds() == 3600
    assert entry["kwargs"]["min_rows"] == 10 and entry["kwargs"]["settle_s"] == 60.0
