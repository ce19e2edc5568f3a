"""Reachability of the configured object storage (local directory or S3 bucket)."""

from __future__ import annotations

from pathlib import Path

from workers.settings import Settings


def s3_client(settings: Settings):  # noqa: ANN201
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.storage.s3_endpoint_url,
        region_name=settings.storage.s3_region,
        config=Config(connect_timeout=settings.storage.fetch_timeout_s, read_timeout=settings.storage.fetch_timeout_s,
                      retries={"max_attempts": 2, "mode": "standard"}),
    )


def check_storage(settings: Settings) -> str:
    uri = settings.originals_uri
    if uri.startswith("s3://"):
        bucket = uri[5:].split("/", 1)[0]
        s3_client(settings).head_bucket(Bucket=bucket)
        return f"S3 bucket {bucket} reachable"
    path = Path(uri)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".doctor-probe"
    probe.write_bytes(b"ok")
    probe.unlink()
    return f"local directory {path} writable"
