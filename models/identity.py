"""One identity per model: what the registry, stored rows and reuse checks call a set of weights.

Workers (``ModelBundle.versions()``), the embedding backfill (``ClipEmbedder.version()``), training
and doctor all ask ``model_identity``; nothing else derives a name or revision, so one model gets
one ``model_versions`` row whichever path registers it.

Forms (``ModelIdentity.canonical`` is ``name@revision``):

- local directory or ``s3://`` prefix (mirrored into the cache first): ``sha256-<16 hex>``, a hash
  of every weight file's relative path and bytes. Fine-tunes of one architecture share file names,
  sizes and configs, so only the bytes tell them apart. The digest is cached per process and in
  ``<cache_dir>/weight-digests.json``, keyed by path and each file's size and mtime, so gigabytes are
  read once per host, not at every worker start.
- hub id (and a clip ``hf-hub:org/repo``): ``hub-<12 hex>``, the snapshot commit in the local
  Hugging Face cache.
- open_clip ``ARCH/tag``: ``tag-<tag>``.
- ``tiny`` / ``random-full`` profiles: ``random-seed<N>``.

``name`` is the ref as configured (stripped) for the pretrained profile, not the resolved cache path:
it is what an operator set and recognises, and it is the same on every host, while a mirror's path
depends on the host's cache dir. The revision, not the name, says which bytes were loaded.

``random_weights`` belongs to the weights, not the profile: a directory carries it in
``enrich-weights.json`` (``write_provenance``), written by the saver; a directory or hub snapshot
without that file is real weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.base import ModelVersionInfo
from models.errors import ModelError
from models.loading import (
    _COMPLETE_MARKER,
    _hf_cached,
    is_s3_uri,
    local_path,
    looks_like_path,
    resolve_model_ref,
    weights_missing,
)

KINDS = ("detector", "vlm", "clip")
PROFILES = ("pretrained", "random-full", "tiny")
PROVENANCE_FILE = "enrich-weights.json"
DIGEST_CACHE_FILE = "weight-digests.json"
from models.config import DEFAULT_CACHE_DIR  # noqa: E402  (re-exported)

TINY_DETECTOR_NAME = "owlv2-tiny"
# tiny and random-full VLMs are built from SmolVLM-256M's architecture (models.vlm_builders).
RANDOM_VLM_NAME = "HuggingFaceTB/SmolVLM-256M-Instruct"
RANDOM_FULL_CLIP_FALLBACK = "ViT-B-32"

_NOT_WEIGHTS = frozenset({_COMPLETE_MARKER, PROVENANCE_FILE})
# `hf download --local-dir` keeps per-file download metadata (timestamps, etags) under .cache/.
_SKIPPED_DIRS = frozenset({".cache"})
_CHUNK = 1 << 20
_TAG_EXPECTED = "expected 'ARCH/pretrained-tag' (e.g. ViT-B-32/laion2b_s34b_b79k)"


ModelIdentity = ModelVersionInfo
"""Which weights a model stage runs, known without loading them (``dims`` is left to the wrapper)."""


# --- the identity function ---------------------------------------------------------------------


def model_name(kind: str, ref: str, *, profile: str) -> str:
    """The ``name`` part of the identity (cheap: never reads weights)."""
    _check(kind, profile)
    ref = ref.strip()
    if profile == "pretrained":
        return ref
    if kind == "detector":
        return TINY_DETECTOR_NAME if profile == "tiny" else ref
    if kind == "vlm":
        return f"{RANDOM_VLM_NAME}:{profile}"
    if profile == "tiny":
        from models.tiny import TINY_CLIP_ARCH

        return TINY_CLIP_ARCH
    if _is_directory_ref(ref) or ref.startswith("hf-hub:"):
        return RANDOM_FULL_CLIP_FALLBACK
    return ref.partition("/")[0]


def model_identity(
    kind: str,
    ref: str,
    *,
    profile: str,
    cache_dir: Path | None = None,
    s3_endpoint_url: str | None = None,
    seed: int = 0,
) -> ModelIdentity:
    """The identity of the ``kind`` model configured as ``ref`` under ``profile``.

    Raises ``WeightsMissing`` when a pretrained ref cannot be found (missing directory, unreachable
    S3 prefix, hub id not in the local cache, clip ref that is not ``ARCH/tag``). ``cache_dir`` is
    the model cache: S3 mirrors and the persisted digest cache live there (no persisted cache when
    None; S3 mirrors then go to ``models.config.DEFAULT_CACHE_DIR``).
    """
    name = model_name(kind, ref, profile=profile)
    if profile != "pretrained":
        from models.tiny import random_revision

        return ModelIdentity(kind, name, random_revision(seed), profile, True)
    ref = ref.strip()
    if _is_directory_ref(ref):
        directory = Path(resolve_model_ref(ref, cache_dir=cache_dir or DEFAULT_CACHE_DIR,
                                           s3_endpoint_url=s3_endpoint_url, kind=kind))
        provenance = read_provenance(directory)
        random_weights = bool(provenance["random_weights"]) if provenance else False
        revision = directory_revision(directory, cache_dir=cache_dir)
        return ModelIdentity(kind, name, revision, profile, random_weights)
    if kind == "clip" and not ref.startswith("hf-hub:"):
        _, _, tag = ref.partition("/")
        if not tag:
            raise weights_missing(kind, ref, _TAG_EXPECTED)
        return ModelIdentity(kind, name, f"tag-{tag}", profile, False)
    repo_id = ref.removeprefix("hf-hub:")
    revision, random_weights = _hub_snapshot(kind, ref, repo_id)
    return ModelIdentity(kind, name, revision, profile, random_weights)


def _check(kind: str, profile: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(KINDS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown model profile {profile!r}: expected one of {', '.join(PROFILES)}")


def _is_directory_ref(ref: str) -> bool:
    return is_s3_uri(ref) or looks_like_path(ref) or local_path(ref).is_dir()


def _hub_snapshot(kind: str, ref: str, repo_id: str) -> tuple[str, bool]:
    """(``hub-<commit>``, random_weights) from the local Hugging Face cache."""
    markers = ("open_clip_config.json", "config.json") if kind == "clip" else ("config.json",)
    try:
        cached = _hf_cached(repo_id, markers)
    except ValueError as exc:  # huggingface_hub rejects malformed repo ids
        raise weights_missing(kind, ref, f"not a hub id ({exc})") from exc
    parts = Path(cached).parts if cached else ()
    if "snapshots" not in parts:
        raise weights_missing(kind, ref, "not in the local Hugging Face cache")
    snapshot = Path(*parts[: parts.index("snapshots") + 2])
    provenance = read_provenance(snapshot)
    return "hub-" + snapshot.name[:12], bool(provenance["random_weights"]) if provenance else False


# --- provenance ------------------------------------------------------------------------------------


def write_provenance(
    directory: Path,
    *,
    random_weights: bool,
    base: str,
    produced_by: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Record beside saved weights whether they are random, what they came from and who wrote them.

    ``base`` is the canonical identity (``name@revision``) of the model the weights started from;
    ``extra`` adds fields (dataset, method) but cannot override the fixed ones. The file is not part
    of the content hash, so rewriting it does not change the revision.
    """
    if not isinstance(random_weights, bool):
        raise TypeError(f"random_weights must be a bool, not {type(random_weights).__name__}")
    record: dict[str, Any] = {"random_weights": random_weights, "base": base, "produced_by": produced_by,
                              "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    clash = sorted(set(extra or {}) & set(record))
    if clash:
        raise ValueError(f"provenance extra may not set {', '.join(clash)}")
    record.update(extra or {})
    target = Path(directory) / PROVENANCE_FILE
    _write_json_atomically(target, record)
    return target


def read_provenance(directory: Path) -> dict[str, Any] | None:
    """The provenance record in ``directory``, or None when it has none (real weights).

    A file that exists but cannot be read raises ``ModelError``: guessing would mislabel the weights.
    """
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable weights provenance {path}: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("random_weights"), bool):
        raise ModelError(f"weights provenance {path} has no boolean 'random_weights'")
    return record


# --- content hash ----------------------------------------------------------------------------------

_memo: dict[str, tuple[str, str]] = {}  # resolved directory -> (stat signature, digest)
_memo_lock = threading.Lock()


def directory_revision(directory: Path, *, cache_dir: Path | None = None) -> str:
    """``sha256-<16 hex>`` of the weight files in ``directory`` (see ``weights_digest``)."""
    return "sha256-" + weights_digest(directory, cache_dir=cache_dir)[:16]


def weights_digest(directory: Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 over every weight file's relative path, size and bytes, in path order.

    Skips the download marker, the provenance file and ``.cache/``. Computed once per process per
    (directory, sizes, mtimes); with ``cache_dir`` also remembered on disk for other processes.
    """
    directory = Path(directory).resolve()
    for _ in range(3):
        files = _weight_files(directory)
        signature = _signature(files)
        key = str(directory)
        with _memo_lock:
            hit = _memo.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        digest = _persisted_digest(cache_dir, key, signature) if cache_dir is not None else None
        persisted = digest is not None
        if digest is None:
            digest = _hash_files(files)
            if _signature(_weight_files(directory)) != signature:
                continue  # written to while hashed; hash the settled files
        with _memo_lock:
            _memo[key] = (signature, digest)
        if cache_dir is not None and not persisted:
            _persist_digest(cache_dir, key, signature, digest)
        return digest
    raise ModelError(f"weights in {directory} kept changing while being hashed")


def _weight_files(directory: Path) -> list[tuple[str, Path, int, int]]:
    """(relative posix path, path, size, mtime_ns) of each weight file, sorted by path."""
    out: list[tuple[str, Path, int, int]] = []
    for root, dirs, names in os.walk(directory):
        here = Path(root)
        if here == directory:
            dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in names:
            path = here / name
            rel = path.relative_to(directory).as_posix()
            if rel in _NOT_WEIGHTS:
                continue
            st = path.stat()  # follows symlinks, as reading does (HF snapshots link to blobs)
            out.append((rel, path, st.st_size, st.st_mtime_ns))
    return sorted(out)


def _signature(files: list[tuple[str, Path, int, int]]) -> str:
    h = hashlib.sha256()
    for rel, _, size, mtime_ns in files:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return h.hexdigest()


def _hash_files(files: list[tuple[str, Path, int, int]]) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    for rel, path, size, _ in files:
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as fh:
            while n := fh.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()


def _persisted_digest(cache_dir: Path, key: str, signature: str) -> str | None:
    entry = _read_digest_cache(Path(cache_dir)).get(key)
    if not isinstance(entry, dict) or entry.get("signature") != signature:
        return None
    digest = entry.get("digest")
    if isinstance(digest, str):
        return digest
    return None


def _read_digest_cache(cache_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((cache_dir / DIGEST_CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _persist_digest(cache_dir: Path, key: str, signature: str, digest: str) -> None:
    cache_dir = Path(cache_dir)
    with _memo_lock:
        entries = _read_digest_cache(cache_dir)
        entries[key] = {"signature": signature, "digest": digest}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(cache_dir / DIGEST_CACHE_FILE, {"version": 1, "entries": entries})
        except OSError:
            pass  # a read-only cache costs a rehash in the next process, never a wrong answer


def _write_json_atomically(target: Path, data: Any) -> None:
    """Readers (other workers) see the old file or the new one, never half of one."""
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def clear_digest_memo() -> None:
    """Forget this process's digests (tests; the persisted cache is kept)."""
    with _memo_lock:
        _memo.clear()
