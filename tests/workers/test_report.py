"""``enrich report`` run as an operator runs it (a non-superuser login that may ``SET ROLE
enrich_admin``), over committed rows of real photos, and the page checked in headless Chromium:
it renders, every grounding box sits where the stored coordinates say, and a screenshot shows it."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.engine import make_engine
from db.repositories import images as image_rows
from db.repositories import listings
from models.hashing import perceptual_hashes, sha256_hex
from models.images import decode_image
from tasks.io.blobs import LocalBlobStore, original_key
from tests.conftest import ADMIN_ROLE, fresh_database, login_role
from tests.db.catalog_rows import add_model_version, add_products, add_tenant
from tests.security.test_maintenance_role import enrich

TENANT, OTHER, EMPTY = "rep-a", "rep-b", "rep-empty"
HOSTILE_TITLE = '<img src=x onerror="document.title=1"> Summer dress'
WINDOW = (1280, 1800)
# How far each seeded product's image embedding lies from the first one's (by seeding order: four
# photos, the first one's identical re-listing, the second one's re-upload), and the one grounded
# below the detector's threshold (no box).
DRIFT = [0.0, 0.3, 0.6, 0.9, 0.0, 1.2]
FALLBACK = 3


@dataclass
class Seeded:
    url: str  # the superuser's, to read back what is stored
    owner_url: str  # a non-superuser login that owns the tables and may SET ROLE enrich_admin
    data_dir: Path  # ENRICH_DATA_DIR: the originals live under it
    skus: list[str]  # tenant A's products with a listing

    def stored_boxes(self) -> dict[str, tuple[list[float], int, int]]:
        """External id → (grounding box of its listing, image width, height), as the database has them."""
        engine = make_engine(self.url, pool_size=1)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT p.external_id, g.box, i.width, i.height FROM listings l "
                    "JOIN products p ON p.id = l.product_id JOIN groundings g ON g.id = l.grounding_id "
                    "JOIN images i ON i.id = l.image_id WHERE l.tenant_id = :t AND NOT g.fallback"),
                    {"t": TENANT}).all()
        finally:
            engine.dispose()
        return {r.external_id: (r.box, r.width, r.height) for r in rows}


def _store(session: Session, blobs: LocalBlobStore, tenant: str, data: bytes) -> tuple[int, int, int]:
    decoded = decode_image(data)
    sha = sha256_hex(data)
    uri = blobs.put(original_key(tenant, sha), data)
    hashes = perceptual_hashes(decoded.image)
    image_id, _ = image_rows.upsert(session, tenant, image_rows.NewImage(
        sha256=sha, phash=hashes.phash, dhash=hashes.dhash, width=decoded.width, height=decoded.height,
        byte_size=len(data), format=decoded.format, storage_uri=uri))
    return image_id, decoded.width, decoded.height


def _near_copy(path: Path) -> bytes:
    with Image.open(path) as im:
        w, h = im.size
        buf = io.BytesIO()
        im.convert("RGB").crop((int(w * 0.04), int(h * 0.04), w, h)).save(buf, "JPEG", quality=40)
    return buf.getvalue()


def _job(session: Session, tenant: str, product_id: int, status: str, *, code: str | None = None) -> None:
    event = uuid.uuid4()
    session.execute(text("INSERT INTO inbox_events (event_id, tenant_id, event_type, status) "
                         "VALUES (:e, :t, 'product.created', 'accepted')"), {"e": event, "t": tenant})
    session.execute(text(
        "INSERT INTO enrichment_jobs (tenant_id, event_id, product_id, product_version, status, error_code, "
        "timings_ms, created_at, finished_at) VALUES (:t, :e, :p, 1, :s, :c, CAST(:tm AS jsonb), "
        "now() - interval '20 seconds', now())"),
        {"t": tenant, "e": event, "p": product_id, "s": status, "c": code,
         "tm": json.dumps({"fetch": 120.0, "ground": 300.0, "persist": 40.0} if status == "done" else {"fetch": 80.0})})


def _listing(session: Session, tenant: str, product_id: int, image_id: int, ids: dict[str, int], *,
             box: list[float] | None, title: str, category: str) -> int:
    grounding = listings.upsert_grounding(session, tenant_id=tenant, image_id=image_id, detector_id=ids["detector"],
                                          prompt=f"a photo of a {category}", box=box, score=0.83 if box else 0.04,
                                          fallback=box is None)
    content = {"title": title, "description": "Plain cotton garment photographed flat.",
               "attributes": {"color": {"value": "blue", "confidence": 0.91, "source": "image"},
                              "material": {"value": "cotton", "confidence": None, "source": "merchant"}}}
    dropped = {"pattern": {"value": "striped", "reason": "below_margin", "clip_value": "solid", "confidence": 0.34}}
    listing_id, _ = listings.insert_listing(session, dict(
        tenant_id=tenant, product_id=product_id, product_version=1, model_version_id=ids["vlm"], image_id=image_id,
        grounding_id=grounding, category=category, schema_id=f"{category}@1", content=content,
        dropped_attributes=dropped, model_output={}, model_input={}, model_versions=ids, random_weights=True))
    return listing_id


def _seed(session: Session, blobs: LocalBlobStore, photos: list[tuple[Path, str]]) -> list[str]:
    for t in (TENANT, OTHER, EMPTY):
        add_tenant(session, t)
    ids = {kind: add_model_version(session, kind, f"report-{kind}", dims=512 if kind == "clip" else None)
           for kind in ("detector", "vlm", "clip")}
    rng = np.random.default_rng(7)
    base = rng.standard_normal(512)
    # Tenant A: real photos of four categories, an identical re-listing of the first, a re-encoded
    # crop of the second; tenant B: one more photo.
    picked, spare = photos[0::2][:4], photos[1]
    skus = [*(f"{c}-1" for _, c in picked), f"{picked[0][1]}-1-relisted", f"{picked[1][1]}-1-reupload"]
    sources = [p.read_bytes() for p, _ in picked] + [picked[0][0].read_bytes(), _near_copy(picked[1][0])]
    cats = [c for _, c in picked] + [picked[0][1], picked[1][1]]
    pids = add_products(session, TENANT, skus, cats)
    image_of: dict[str, int] = {}
    for n, (sku, pid, data, cat) in enumerate(zip(skus, pids, sources, cats, strict=True)):
        image_id, w, h = _store(session, blobs, TENANT, data)
        image_of[sku] = image_id
        image_rows.link_to_product(session, tenant_id=TENANT, product_id=pid, product_version=1, position=0,
                                   image_id=image_id, role="primary", source_url=f"s3://uploads/{sku}.jpg")
        # Each box elsewhere (the re-listing's grounding is its image's: the same row as the first's).
        box = None if n == FALLBACK else [w * (0.1 + 0.05 * n), h * (0.15 + 0.02 * n), w * 0.8, h * (0.9 - 0.03 * n)]
        listing_id = _listing(session, TENANT, pid, image_id, ids, box=box, category=cat,
                              title=HOSTILE_TITLE if n == 0 else f"{cat} {sku}")
        vec = base + DRIFT[n] * rng.standard_normal(512)  # the re-listing has the first one's embedding
        listings.insert_embedding(session, dict(
            tenant_id=TENANT, product_id=pid, listing_id=listing_id, model_version_id=ids["clip"], category=cat,
            dims=512, image_embedding=(vec / np.linalg.norm(vec)).tolist(),
            text_embedding=(vec / np.linalg.norm(vec)).tolist(), text_input="blue garment"))
        _job(session, TENANT, pid, "done")
    image_rows.record_exact_duplicate(session, TENANT, image_of[skus[0]])
    image_rows.record_near_duplicate(session, TENANT, image_of[skus[5]], image_of[skus[1]], hamming=6, inliers=212)
    failed = add_products(session, TENANT, ["broken-1"], ["dress"])[0]
    _job(session, TENANT, failed, "failed", code="image_rejected")
    other = add_products(session, OTHER, ["other-1"], [spare[1]])[0]
    other_image, _, _ = _store(session, blobs, OTHER, spare[0].read_bytes())
    image_rows.link_to_product(session, tenant_id=OTHER, product_id=other, product_version=1, position=0,
                               image_id=other_image, role="primary", source_url="s3://uploads/o.jpg")
    _listing(session, OTHER, other, other_image, ids, box=None, title="other tenant listing", category=spare[1])
    add_products(session, EMPTY, ["nothing-yet"], ["hat"])
    return skus


@pytest.fixture(scope="module")
def seeded(pg_url: str, sample_photos: list[tuple[Path, str]],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A database of its own (rows are committed, as the pipeline would commit them), owned by a
    non-superuser login; originals in a local store under the data dir the command is given."""
    url = fresh_database(pg_url, "report_cli")  # left for the session's throwaway server to take along
    data_dir = tmp_path_factory.mktemp("report-data")
    engine = make_engine(url, pool_size=1)
    try:
        with Session(engine) as s, s.begin():
            skus = _seed(s, LocalBlobStore(data_dir / "originals"), sample_photos)
    finally:
        engine.dispose()
    with login_role(url, member_of=(ADMIN_ROLE,), inherit=False, owns_schema=True) as owner_url:
        yield Seeded(url, owner_url, data_dir, skus)


def report_cmd(seeded: Seeded, *args: str) -> subprocess.CompletedProcess[str]:
    """``enrich report …`` as the operator's login, on the seeded originals."""
    return enrich(seeded.owner_url, seeded.data_dir, "report", *args)


@pytest.fixture(scope="module")
def report(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("report") / "report.html"
    res = report_cmd(seeded, "--tenant", TENANT, "--output", str(target))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(target.resolve())
    assert f"report of {len(seeded.skus)} products" in res.stdout
    return target


# ---------------------------------------------------------------- the page, as text

def test_page_is_one_small_file_with_everything_embedded(report: Path) -> None:
    html = report.read_text()
    assert len(html.encode()) < 1_500_000
    assert not re.search(r"""(src|href)=["']?(https?:|file:|//)""", html)  # nothing fetched from anywhere
    assert html.count('<img src="data:image/jpeg;base64,') >= 6 + 6  # a photo and a crop per product
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "<script" not in html


def test_page_shows_attributes_duplicates_neighbours_and_the_summary(report: Path, seeded: Seeded) -> None:
    html = report.read_text()
    articles = re.findall(r'<article class="product" data-tenant="([^"]+)" data-external-id="([^"]+)"', html)
    assert sorted(a[1] for a in articles) == sorted(seeded.skus) and {a[0] for a in articles} == {TENANT}
    assert "other-1" not in html and "broken-1" not in html  # another tenant; a product without a listing
    assert "<td>color</td><td>blue</td><td>0.910</td><td>image</td>" in html
    assert "<td>material</td><td>cotton</td><td>–</td><td>merchant</td>" in html
    assert "<td>pattern</td><td>striped</td><td>below_margin</td><td>solid</td><td>0.340</td>" in html
    # The identical re-listing: one image used by two products; the re-upload: a near member.
    first, second, relisted, reupload = (seeded.skus[i] for i in (0, 1, 4, 5))
    dress = _article(html, first)
    assert 'data-method="exact"' in dress and f"used by {relisted}" in dress
    assert f"used by {first}" in _article(html, relisted)
    hat = _article(html, second)
    assert 'data-method="near"' in hat and "Hamming 6 · 212 inliers" in hat and f"used by {reupload}" in hat
    assert re.search(r'<span class="thumb i\d+" role="img" aria-label="this photo"></span> ↔ '
                     r'<span class="thumb i\d+" role="img" aria-label="duplicate">', hat)
    # Nearest products in the order catalog.similar_products gives (the embeddings drift away from the first).
    near = re.findall(r'<li class="neighbour" data-external-id="([^"]+)"', dress)
    assert near == [seeded.skus[i] for i in sorted(range(1, 6), key=lambda i: DRIFT[i])]
    assert "<td>image_rejected</td><td>1</td>" in html  # failures by code
    assert "<td>done</td><td>6</td>" in html and "<td>failed</td><td>1</td>" in html
    assert re.search(r"<td>ground</td><td>6</td><td>300</td>", html)  # stage timings from the job rows
    assert "RANDOM WEIGHTS" in html
    # Merchant and model text is data: escaped, never markup.
    assert HOSTILE_TITLE not in html and "&lt;img src=x onerror=" in html
    assert "full image (fallback, score 0.04)" in _article(html, seeded.skus[FALLBACK])


def _article(html: str, sku: str) -> str:
    start = html.index(f'data-external-id="{sku}">')
    return html[start:html.index("</article>", start)]


# ---------------------------------------------------------------- the page, in a browser

MEASURE = """<script>
const out = {photos: [], thumbs: [], title: document.title, injected: document.querySelectorAll('img[src=x]').length};
for (const fig of document.querySelectorAll('figure.photo')) {
  const img = fig.querySelector('img');
  const r = img.getBoundingClientRect();
  const e = {product: fig.closest('article').dataset.externalId, image: fig.dataset.imageId,
             img: [r.left, r.top, r.width, r.height], loaded: img.complete && img.naturalWidth > 0};
  const box = fig.querySelector('.box');
  if (box) { const b = box.getBoundingClientRect(); e.box = [b.left, b.top, b.width, b.height]; }
  out.photos.push(e);
}
for (const t of document.querySelectorAll('.thumb')) {
  const s = getComputedStyle(t);
  out.thumbs.push([s.backgroundImage.startsWith('url("data:image/jpeg'), t.getBoundingClientRect().width]);
}
const pre = document.createElement('pre'); pre.id = 'measured'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("headless Chromium is not installed (Debian package `chromium`; infra/scripts/test.sh installs it)")


def _browse(tmp_path: Path, page: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *mode, page.as_uri()],
        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def measured(report: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The page with a measuring script appended (the report itself has none, and its policy
    forbids scripts, so the copy drops the policy), dumped after load."""
    tmp = tmp_path_factory.mktemp("chromium")
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", report.read_text())
    probe = tmp / "measure.html"
    probe.write_text(html.replace("</body>", MEASURE + "</body>"))
    res = _browse(tmp, probe, "--dump-dom")
    found = re.search(r'<pre id="measured">(.*?)</pre>', res.stdout, re.S)
    assert found, res.stderr[-2000:]
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def test_boxes_sit_where_the_stored_coordinates_say(measured: dict, seeded: Seeded) -> None:
    by_product = {p["product"]: p for p in measured["photos"]}
    assert set(by_product) == set(seeded.skus) and all(p["loaded"] for p in measured["photos"])
    stored = seeded.stored_boxes()
    assert set(stored) == set(seeded.skus) - {seeded.skus[FALLBACK]}
    for sku, (box, width, height) in stored.items():
        left, top, w, h = by_product[sku]["img"]
        x0, y0, x1, y1 = box
        expected = [left + x0 / width * w, top + y0 / height * h, (x1 - x0) / width * w, (y1 - y0) / height * h]
        assert by_product[sku]["box"] == pytest.approx(expected, abs=1.0), sku
    assert "box" not in by_product[seeded.skus[FALLBACK]]  # a fallback draws no box
    assert measured["thumbs"] and all(ok and width == 96 for ok, width in measured["thumbs"])
    assert measured["injected"] == 0 and measured["title"].startswith("catalog-enrich report")


def test_screenshot_shows_the_box(report: Path, measured: dict, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    res = _browse(tmp_path, report, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000, res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == WINDOW
        pixels = im.convert("RGB")
        first = next(p for p in measured["photos"] if "box" in p and p["box"][1] + p["box"][3] < WINDOW[1])
        left, top, w, h = first["box"]
        # The 2px outline is drawn just outside the box: the report's red on each side of it.
        for x, y in ((left - 1, top + h / 2), (left + w + 0.5, top + h / 2), (left + w / 2, top - 1)):
            r, g, b = pixels.getpixel((int(x), int(y)))
            assert r > 180 and g < 120 and b < 130, (first["product"], x, y, (r, g, b))


# ---------------------------------------------------------------- scope and errors

def test_every_tenant_without_a_tenant_option(seeded: Seeded, tmp_path: Path) -> None:
    target = tmp_path / "all.html"
    res = report_cmd(seeded, "--output", str(target), "--neighbours", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    html = target.read_text()
    assert 'data-external-id="other-1"' in html and f'data-external-id="{seeded.skus[0]}"' in html
    assert "all tenants (3)" in html


def test_unknown_tenant_and_empty_catalogue_are_one_line_errors(seeded: Seeded, tmp_path: Path) -> None:
    res = report_cmd(seeded, "--tenant", "no-such-tenant", "--output", str(tmp_path / "x.html"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "tenant 'no-such-tenant' not found (tenants: rep-a, rep-b, rep-empty)" in res.stderr
    res = report_cmd(seeded, "--tenant", EMPTY, "--output", str(tmp_path / "y.html"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"tenant '{EMPTY}' has no enriched products yet (1 products; jobs: none)" in res.stderr
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "y.html").exists()
