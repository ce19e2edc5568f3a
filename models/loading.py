"""Where model weights come from: a local directory, an ``s3://`` prefix, or a hub id.

Every model setting (``ENRICH_MODELS__DETECTOR`` / ``__VLM`` / ``__CLIP``) accepts the same three
forms. S3 prefixes are mirrored once into the model cache (keyed by URI, written to a temporary
directory and renamed into place, so a crashed download is never mistaken for a complete one and
concurrent workers on one host do not corrupt each other). Hub ids are handed to ``from_pretrained``
untouched: with ``HF_HUB_OFFLINE=1`` that fails at once, and the wrappers turn the failure into
``WeightsMissing`` naming the setting to change.

``weights_status`` answers ``enrich doctor`` without loading anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from models.errors import WeightsMissing

SETTING_FOR_KIND: dict[str, str] = {
    "detector": "ENRICH_MODELS__DETECTOR",
    "vlm": "ENRICH_MODELS__VLM",
    "clip": "ENRICH_MODELS__CLIP",
}
_ALTERNATIVES = (
    "a local directory with the saved weights, an s3:// prefix holding them, a hub id already in the "
    "local Hugging Face cache, or ENRICH_MODELS__PROFILE=tiny / random-full for random weights "
    "(outputs then carry random_weights=true and mean nothing)"
)
_COMPLETE_MARKER = ".download-complete"


def weights_missing(kind: str, ref: str, detail: str) -> WeightsMissing:
    """A ``WeightsMissing`` whose message says which setting to change and to what."""
    setting = SETTING_FOR_KIND.get(kind, "ENRICH_MODELS__*")
    return WeightsMissing(
        f"{kind} weights {ref!r} are not available: {detail.rstrip('. ')}. Set {setting} to {_ALTERNATIVES}.",
        reason="weights_missing",
    )


def is_s3_uri(ref: str) -> bool:
    return ref.startswith("s3://")


def looks_like_path(ref: str) -> bool:
    """Refs that can only mean a filesystem path (so a missing one is an error, not a hub id)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.startswith("file://")


def local_path(ref: str) -> Path:
    return Path(ref.removeprefix("file://")).expanduser()


def s3_cache_dir(uri: str, cache_dir: Path) -> Path:
    """The directory an S3 prefix is mirrored into: a readable tail plus a hash of the full URI."""
    normalized = uri.rstrip("/")
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", normalized.rsplit("/", 1)[-1])[:48] or "root"
    return Path(cache_dir) / "s3" / f"{tail}-{digest}"


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def _s3_client(endpoint_url: str | None, *, quick: bool = False):  # noqa: ANN202 - boto3 client type is dynamic
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}) if quick else None
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def download_s3_prefix(uri: str, *, cache_dir: Path, endpoint_url: str | None = None, kind: str = "model") -> Path:
    """Mirror every object under ``uri`` into the cache once; later calls reuse the mirror."""
    from botocore.exceptions import BotoCoreError, ClientError

    target = s3_cache_dir(uri, cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    bucket, prefix = _split_s3(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        client = _s3_client(endpoint_url)
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                relative = key[len(prefix):]
                if not relative or key.endswith("/"):
                    continue
                dest = (staging / relative).resolve()
                if staging.resolve() not in dest.parents:
                    raise weights_missing(kind, uri, f"object key {key!r} escapes the download directory")
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(dest))
                count += 1
        if count == 0:
            raise weights_missing(kind, uri, "no objects under that S3 prefix")
        (staging / _COMPLETE_MARKER).write_text(uri + "\n")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its complete mirror wins.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    except (ClientError, BotoCoreError) as exc:
        raise weights_missing(kind, uri, f"S3 download failed ({type(exc).__name__}: {exc})") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_ref(
    ref: str, *, cache_dir: Path, s3_endpoint_url: str | None = None, kind: str = "model"
) -> str:
    """A local directory for ``from_pretrained`` / open_clip, or the hub id unchanged.

    Raises ``WeightsMissing`` for a path that does not exist or an S3 prefix that cannot be fetched.
    """
    ref = ref.strip()
    if is_s3_uri(ref):
        return str(download_s3_prefix(ref, cache_dir=cache_dir, endpoint_url=s3_endpoint_url, kind=kind))
    path = local_path(ref)
    if path.is_dir():
        return str(path.resolve())
    if looks_like_path(ref):
        raise weights_missing(kind, ref, f"directory {path} does not exist")
    return ref


# --- doctor ----------------------------------------------------------------------------------------


def parse_open_clip_ref(ref: str) -> tuple[str, str | None] | None:
    """``("ViT-B-32", "laion2b_s34b_b79k")`` for an open_clip ``ARCH/tag`` ref, None for anything else."""
    import open_clip

    arch, _, tag = ref.partition("/")
    if arch in open_clip.list_models():
        return arch, (tag or None)
    return None


def _hf_cached(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return hit
    return None


_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                           "open_clip_pytorch_model.safetensors")


def _open_clip_status(arch: str, tag: str | None) -> tuple[bool, str]:
    import open_clip

    if tag is None:
        return False, f"open_clip {arch} without a pretrained tag has random weights; set ARCH/tag"
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return False, f"open_clip has no pretrained tag {tag!r} for {arch}"
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        hit = _hf_cached(repo_id.rstrip("/"), (filename,) if filename else _OPEN_CLIP_WEIGHT_FILES)
        if hit:
            return True, f"open_clip {arch}/{tag} cached at {hit}"
        return False, f"open_clip {arch}/{tag} not in the Hugging Face cache (repo {repo_id}); no hub here"
    url = cfg.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if url and cached.is_file():
        return True, f"open_clip {arch}/{tag} cached at {cached}"
    return False, f"open_clip {arch}/{tag} not cached (would download {url})"


def _s3_status(ref: str, cache_dir: Path, endpoint_url: str | None) -> tuple[bool, str]:
    cached = s3_cache_dir(ref, cache_dir)
    if (cached / _COMPLETE_MARKER).is_file():
        return True, f"{ref} cached at {cached}"
    try:
        bucket, prefix = _split_s3(ref)
        listing = _s3_client(endpoint_url, quick=True).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as exc:  # noqa: BLE001 - doctor reports any failure as "not available"
        return False, f"{ref} not cached and not reachable ({type(exc).__name__}: {exc})"
    if listing.get("KeyCount", 0) == 0:
        return False, f"{ref}: no objects under that prefix"
    return True, f"{ref} present in S3, downloaded to {cached} on first load"


def weights_status(
    ref: str, *, profile: str, cache_dir: Path, s3_endpoint_url: str | None = None
) -> tuple[bool, str]:
    """(present, detail) for ``enrich doctor``: whether a load with this profile can find its weights."""
    if profile != "pretrained":
        return True, f"{profile} profile: random weights built locally (outputs are not meaningful)"
    if is_s3_uri(ref):
        return _s3_status(ref, cache_dir, s3_endpoint_url)
    path = local_path(ref)
    if path.is_dir():
        markers = [p.name for p in path.iterdir() if p.name in {"config.json", "open_clip_config.json"}]
        if markers:
            return True, f"local directory {path} ({', '.join(markers)})"
        return False, f"local directory {path} has no config.json or open_clip_config.json"
    if looks_like_path(ref):
        return False, f"directory {path} does not exist"
    open_clip_ref = parse_open_clip_ref(ref)
    if open_clip_ref is not None:
        return _open_clip_status(*open_clip_ref)
    config = _hf_cached(ref, ("config.json",))
    weights = _hf_cached(ref, _HF_WEIGHT_FILES)
    if config and weights:
        return True, f"{ref} in the Hugging Face cache ({Path(weights).name})"
    return False, f"{ref} not in the Hugging Face cache and there is no model hub here; use a local directory or s3:// URI"
