"""``enrich report``: one static HTML page of what the models did to each enriched product.

Per product: its photos with the grounding box drawn over the listing photo, the crop the models
saw, kept attributes (confidence, source), dropped ones (what the verifier preferred), duplicates
with both images, and the nearest products by image embedding (``catalog.similar_products``);
above them a summary (counts, failures by code, throughput and stage timings from the job rows).

The rows come from one maintenance transaction (``gather``), the pictures from the originals
store afterwards (``thumbs``: downscaled JPEG data URIs, each small one embedded once), and
``page`` writes the HTML. The file needs nothing else to open.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from db.repositories.report_views import ListedProduct, StoredPhoto
from models.boxes import padded_crop_box  # the one crop rule the detector uses (no torch)
from tasks.io.blobs import BlobStore
from workers.report.gather import Catalogue, gather
from workers.report.page import render
from workers.report.thumbs import SMALL_PX, Pictures, Thumb, Thumbnails
from workers.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReportResult:
    path: Path
    products: int
    listed: int
    bytes: int
    unreadable: int  # originals that could not be read (shown as placeholders)


def write_report(factory: sessionmaker[Session], blobs: BlobStore, output: Path, *, tenant: str | None,
                 limit: int = 200, neighbours: int = 5, crop_padding: float = 0.05) -> ReportResult:
    started = time.monotonic()
    catalogue = gather(factory, tenant, limit=limit, neighbours=neighbours)
    images = Thumbnails(blobs)
    html = render(catalogue, _pictures(catalogue, images, crop_padding), crop_padding)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(output)
    result = ReportResult(output, len(catalogue.entries), catalogue.summary.listed, len(html.encode()),
                          len(images.unreadable))
    log.info("report.written", path=str(output), tenant=tenant, products=result.products, bytes=result.bytes,
             unreadable=result.unreadable, seconds=round(time.monotonic() - started, 2))
    return result


def report_from_settings(settings: Settings, output: Path | None, *, tenant: str | None, limit: int = 200,
                         neighbours: int = 5) -> ReportResult:
    """``write_report`` on this installation: the maintenance role's sessions, the originals store,
    the crop padding of the settings; ``output`` defaults to ``<data dir>/reports/report-<tenant>.html``."""
    from tasks.io.blobs import open_blob_store
    from workers.database import get_admin_session_factory
    from workers.storage import s3_client

    blobs = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
    return write_report(get_admin_session_factory(settings), blobs, output or default_output(settings.data_dir, tenant),
                        tenant=tenant, limit=limit, neighbours=neighbours, crop_padding=settings.models.crop_padding)


def default_output(data_dir: Path, tenant: str | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", tenant) if tenant else "all-tenants"
    return data_dir / "reports" / f"report-{name}.html"


def _pictures(catalogue: Catalogue, images: Thumbnails, crop_padding: float) -> Pictures:
    photos: dict[int, Thumb | None] = {}
    crops: dict[int, Thumb | None] = {}
    small: dict[int, Thumb] = {}

    def add_small(photo: StoredPhoto | None) -> None:
        if photo is not None and photo.image_id not in small:
            thumb = images.photo(photo, SMALL_PX)
            if thumb is not None:
                small[photo.image_id] = thumb

    for entry in catalogue.entries:
        lp = entry.listed
        for _, photo in entry.photos:
            photos.setdefault(photo.image_id, images.photo(photo))
            if photo.image_id == lp.image_id:
                crops[lp.listing_id] = images.crop(photo, _crop_rect(photo, lp, crop_padding))
        for d in entry.duplicates:
            add_small(d.own)
            add_small(d.other)
        for n in entry.neighbours:
            add_small(n.photo)
    return Pictures(photos, crops, small)


def _crop_rect(photo: StoredPhoto, listed: ListedProduct, padding: float) -> tuple[int, int, int, int]:
    """What the GPU stage cropped: the box grown by the padding (its own rule), or the whole photo."""
    if listed.fallback or not listed.box:
        return (0, 0, photo.width, photo.height)
    return padded_crop_box(tuple(float(v) for v in listed.box[:4]), (photo.width, photo.height), padding)
