"""Placeholder replaced by the model layer (issue 3)."""

from __future__ import annotations

from pathlib import Path


def weights_status(ref: str, *, profile: str, cache_dir: Path) -> tuple[bool, str]:
    if profile != "pretrained":
        return True, f"{profile} profile: random weights, nothing to download"
    if Path(ref).expanduser().is_dir():
        return True, f"local directory {ref}"
    return False, f"{ref} not found locally (no model hub here); set a local directory or s3:// URI"
