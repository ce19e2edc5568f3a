"""Trained weights are stored content-addressed: the same weights are the same key, other weights
another, and nothing behind an existing key is ever written again."""

from __future__ import annotations

from pathlib import Path

from models.identity import PROVENANCE_FILE, write_provenance
from tasks.feedback.training import store_weights
from tasks.io.blobs import LocalBlobStore


def _weights(directory: Path, payload: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "idefics3"}')
    (directory / "model.safetensors").write_bytes(payload)
    write_provenance(directory, random_weights=True, base="tiny@random-seed0", produced_by="tests")
    return directory


def test_same_weights_same_key_and_never_rewritten(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    uri, revision = store_weights(_weights(tmp_path / "a", b"weights-1"), store)
    assert uri.endswith(f"/vlm/{revision}") and revision.startswith("sha256-")
    stored = tmp_path / "store" / "vlm" / revision
    assert (stored / PROVENANCE_FILE).is_file() and (stored / "model.safetensors").read_bytes() == b"weights-1"
    before = {p.name: p.stat().st_mtime_ns for p in stored.iterdir()}

    again_uri, again_revision = store_weights(_weights(tmp_path / "b", b"weights-1"), store)  # trained again
    assert (again_uri, again_revision) == (uri, revision)
    assert {p.name: p.stat().st_mtime_ns for p in stored.iterdir()} == before  # nothing rewritten

    other_uri, other_revision = store_weights(_weights(tmp_path / "c", b"weights-2"), store)
    assert other_revision != revision and other_uri != uri
    assert (stored / "model.safetensors").read_bytes() == b"weights-1"  # the first row's weights untouched
