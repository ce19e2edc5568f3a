"""DPO dataset artifacts: TRL-style JSONL per split plus a manifest, in a local directory or on S3.

Each row is what TRL's DPO trainer reads for a vision model: ``prompt`` (the exact rendered model
input, image token included), ``chosen`` and ``rejected`` (listing JSON serialised the way the
constrained decoder writes it: schema key order, ``", "``/``": "`` separators) and ``images`` (the
stored original's URI; ``image_box`` is the grounding crop applied before the model saw it).
The manifest is written last, so a dataset directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from models.categories import CategorySchema
from tasks.io.blobs import BlobStore

SPLITS = ("train", "holdout")
MANIFEST = "manifest.json"
FORMAT = "trl-dpo-jsonl/1"


def listing_json(schema: CategorySchema, listing: Mapping[str, Any], part: str = "listing") -> str:
    """A listing (or one generation phase's part of it: ``attributes``, ``text``) as the model
    writes it: properties in schema order (JSONB forgets key order)."""
    attr_order = list(schema.visual_attributes)

    def attributes_in_order(attributes: Mapping[str, Any]) -> dict[str, Any]:
        return {k: attributes[k] for k in sorted(attributes, key=lambda k: (
            attr_order.index(k) if k in attr_order else len(attr_order), k))}

    if part == "attributes":
        ordered: dict[str, Any] = attributes_in_order(listing)
    else:
        order = ["title", "description"] if part == "text" else list(schema.json_schema["properties"])
        ordered = {k: (attributes_in_order(listing.get("attributes") or {}) if k == "attributes" else listing[k])
                   for k in order if k in listing}
    return json.dumps(ordered, ensure_ascii=False, separators=(", ", ": "))


@dataclass(frozen=True)
class WrittenDataset:
    uri: str
    content_hash: str
    manifest: dict[str, Any]


def file_key(name: str, split: str) -> str:
    return f"{name}/{split}.jsonl"


def encode_rows(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True).encode() + b"\n" for r in rows)


DPO_COLUMNS = ("prompt", "chosen", "rejected", "images")


def write_dataset(store: BlobStore, name: str, rows_by_split: Mapping[str, list[dict[str, Any]]],
                  manifest: dict[str, Any], *, format: str = FORMAT,  # noqa: A002 - the manifest's key
                  columns: tuple[str, ...] = DPO_COLUMNS) -> WrittenDataset:
    """Write ``<name>/train.jsonl``, ``<name>/holdout.jsonl`` then ``<name>/manifest.json`` (its
    ``format`` and the ``columns`` a trainer reads: TRL's DPO columns unless told otherwise)."""
    digest = hashlib.sha256()
    files: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        data = encode_rows(rows_by_split.get(split, []))
        digest.update(split.encode() + b"\0" + data)
        store.put(file_key(name, split), data)
        files[split] = {"path": f"{split}.jsonl", "rows": len(rows_by_split.get(split, [])),
                        "sha256": hashlib.sha256(data).hexdigest()}
    content_hash = digest.hexdigest()
    full = {**manifest, "name": name, "format": format, "files": files, "content_hash": content_hash,
            "columns": list(columns)}
    store.put(f"{name}/{MANIFEST}", json.dumps(full, indent=2, sort_keys=True, default=str).encode())
    return WrittenDataset(uri=store.uri_for(name), content_hash=content_hash, manifest=full)


def read_split(store: BlobStore, uri: str, split: str) -> list[dict[str, Any]]:
    """The rows of one split of a dataset written by ``write_dataset`` (local or S3)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data = store.get(f"{uri.rstrip('/')}/{split}.jsonl")
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def read_manifest(store: BlobStore, uri: str) -> dict[str, Any]:
    return json.loads(store.get(f"{uri.rstrip('/')}/{MANIFEST}"))
