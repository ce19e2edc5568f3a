"""The report as one static HTML page: inline CSS, images as data URIs, no script.

Every text on the page is escaped (titles, descriptions and attribute values come from merchants
and from models), and a Content-Security-Policy forbids scripts and any fetch, so the file is
safe to open and to mail around. The grounding box is a CSS overlay positioned in percentages of
the photo from the stored coordinates (``data-box`` keeps them), so its place can be measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any

from db.repositories.report_views import ListedProduct, StoredPhoto
from workers.report.gather import Catalogue, Duplicate, Neighbour, ProductEntry, Summary
from workers.report.thumbs import Pictures, Thumb

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2433;background:#f6f7f9}
h1{margin:0 0 4px}h2{margin:0 0 6px;font-size:18px}h3{font-size:14px;margin:12px 0 4px}
.meta{color:#5b6478}.warning{background:#fff4ce;border:1px solid #e0b000;padding:8px 12px;margin:12px 0}
table{border-collapse:collapse;margin:4px 16px 8px 0;background:#fff}
td,th{border:1px solid #d9dde5;padding:2px 8px;text-align:left;vertical-align:top}
caption{text-align:left;font-weight:600;padding:2px 0}
#summary{display:flex;flex-wrap:wrap;align-items:flex-start}
.product{background:#fff;border:1px solid #d9dde5;border-radius:6px;padding:14px;margin:16px 0;
 overflow-wrap:anywhere}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0}figcaption{color:#5b6478;font-size:12px;max-width:360px}
.frame{position:relative;display:block;line-height:0}
.frame img{display:block}
.box{position:absolute;box-sizing:border-box;outline:2px solid #e5484d;background:rgba(229,72,77,.08)}
.thumb{display:inline-block;box-sizing:border-box;width:96px;height:96px;background:#e9ecf1 center/contain no-repeat;
 border:1px solid #d9dde5;vertical-align:middle}
.missing{display:inline-block;padding:24px;background:#e9ecf1;color:#5b6478}
ul,ol{margin:4px 0;padding:0;list-style:none}li{margin:4px 0}
.neighbours ol{display:flex;flex-wrap:wrap;gap:10px}
.neighbour{width:150px;font-size:12px;overflow-wrap:anywhere}.neighbour .thumb{display:block;margin-bottom:2px}
.small{font-size:12px;color:#5b6478}
"""


def render(catalogue: Catalogue, pictures: Pictures, crop_padding: float) -> str:
    """The page; the small thumbnails are CSS classes (``.i<image id>``), so each is embedded once."""
    s = catalogue.summary
    scope = f"tenant {s.tenant}" if s.tenant else f"all tenants ({len(s.tenants)})"
    random = any(e.listed.random_weights for e in catalogue.entries)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>catalog-enrich report: {escape(scope)}</title>",
        f"<style>{_CSS}{_small_css(pictures.small)}</style></head><body>",
        f'<header><h1>Enrichment report</h1><p class="meta">{escape(scope)} · generated '
        f'{s.generated_at:%Y-%m-%d %H:%M:%S} UTC · {s.shown} of {s.listed} enriched products shown</p></header>',
    ]
    if random:
        parts.append('<p class="warning" id="random-weights"><strong>RANDOM WEIGHTS</strong>: listings below were '
                     "made by models with random initialisation; titles, attributes, boxes and similarities "
                     "exercise the pipeline but mean nothing.</p>")
    parts.append(_summary(s))
    parts.append("<main>")
    parts.extend(_product(e, pictures, crop_padding) for e in catalogue.entries)
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _small_css(small: dict[int, Thumb]) -> str:
    return "".join(f'.i{image_id}{{background-image:url("{t.uri}")}}' for image_id, t in sorted(small.items()))


def _table(caption: str, header: list[str], rows: Iterable[Iterable[Any]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><caption>{escape(caption)}</caption><tr>{head}</tr>{body or _empty(header)}</table>"


def _empty(header: list[str]) -> str:
    return f'<tr><td colspan="{len(header)}" class="small">none</td></tr>'


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:,.0f}"
    return str(value)


def _summary(s: Summary) -> str:
    t = s.throughput
    counts = [("products", s.products), ("enriched (current listing)", s.listed), ("shown here", s.shown),
              ("jobs done", t.done), ("done per second (first created → last finished)", t.per_s),
              ("span (s)", round(t.span_s, 1))]
    return ('<section id="summary">'
            + _table("catalogue", ["what", "count"], counts, "counts")
            + _table("jobs by status", ["status", "jobs"], s.jobs_by_status.items(), "jobs")
            + _table("failures by code", ["code", "jobs"], s.failures_by_code.items(), "failures")
            + _table("stage timings of done jobs (ms)", ["stage", "jobs", "mean", "p50", "p95"],
                     [(x.stage, x.jobs, x.mean_ms, x.p50_ms, x.p95_ms) for x in s.stages], "stages")
            + "</section>")


def _product(entry: ProductEntry, pictures: Pictures, crop_padding: float) -> str:
    lp = entry.listed
    content = lp.content or {}
    flags = f" · forced: {', '.join(lp.forced_fields)}" if lp.forced_fields else ""
    head = (f'<article class="product" data-tenant="{escape(lp.tenant_id)}" '
            f'data-external-id="{escape(lp.external_id)}">'
            f"<h2>{escape(lp.external_id)} <span class=\"small\">{escape(lp.category)} · {escape(lp.status)} · "
            f"version {lp.product_version} · tenant {escape(lp.tenant_id)}{escape(flags)}</span></h2>"
            f'<p class="title"><strong>{escape(str(content.get("title", "")))}</strong></p>'
            f'<p class="description small">{escape(str(content.get("description", "")))}</p>')
    photos = "".join(_photo(role, ph, pictures.photos.get(ph.image_id), lp if ph.image_id == lp.image_id else None)
                     for role, ph in entry.photos)
    crop = _crop(entry, pictures.crops.get(lp.listing_id), crop_padding)
    return (head + f'<div class="row photos">{photos}{crop}</div><div class="row facts">{_facts(entry)}</div>'
            + _duplicates(entry.duplicates) + _neighbours(entry) + "</article>")


def _photo(role: str, photo: StoredPhoto, thumb: Thumb | None, listing: ListedProduct | None) -> str:
    attrs = (f'data-image-id="{photo.image_id}" data-sha256="{photo.sha256}" data-width="{photo.width}" '
             f'data-height="{photo.height}"')
    if thumb is None:
        return (f'<figure class="photo" {attrs}><span class="missing">original unavailable</span>'
                f"<figcaption>{escape(role)} · {photo.sha256[:12]}</figcaption></figure>")
    overlay, caption = "", f"{escape(role)} · {photo.width}×{photo.height} · {photo.sha256[:12]}"
    if listing is not None:
        overlay, grounding = _box(photo, listing)
        caption += f" · {grounding}"
    return (f'<figure class="photo" {attrs}><div class="frame" style="width:{thumb.width}px;height:{thumb.height}px">'
            f'<img src="{thumb.uri}" width="{thumb.width}" height="{thumb.height}" alt="{escape(role)} photo">'
            f"{overlay}</div><figcaption>{caption}</figcaption></figure>")


def _box(photo: StoredPhoto, listing: ListedProduct) -> tuple[str, str]:
    score = f"score {listing.score:.2f}" if listing.score is not None else "no score"
    if listing.fallback or not listing.box:
        return "", escape(f"full image (fallback, {score}): the model saw the whole photo")
    x0, y0, x1, y1 = (float(v) for v in listing.box[:4])
    style = (f"left:{100 * x0 / photo.width:.4f}%;top:{100 * y0 / photo.height:.4f}%;"
             f"width:{100 * (x1 - x0) / photo.width:.4f}%;height:{100 * (y1 - y0) / photo.height:.4f}%")
    box = (f'<div class="box" data-box="{x0:g} {y0:g} {x1:g} {y1:g}" style="{style}" '
           f'title="{escape(listing.prompt)}"></div>')
    return box, escape(f"box [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}] {score}, prompt “{listing.prompt}”")


def _crop(entry: ProductEntry, thumb: Thumb | None, padding: float) -> str:
    if thumb is None:
        return ""
    what = ("the full photo (fallback)" if entry.listed.fallback or not entry.listed.box
            else f"box padded by {padding:g} per side (ENRICH_MODELS__CROP_PADDING)")
    return (f'<figure class="crop"><img src="{thumb.uri}" width="{thumb.width}" height="{thumb.height}" '
            f'alt="crop"><figcaption>crop the models saw: {escape(what)}</figcaption></figure>')


def _facts(entry: ProductEntry) -> str:
    lp = entry.listed
    kept = [(name, a.get("value"), a.get("confidence"), a.get("source"))
            for name, a in sorted(((lp.content or {}).get("attributes") or {}).items()) if isinstance(a, dict)]
    dropped = [(name, d.get("value"), d.get("reason"), d.get("clip_value"), d.get("confidence"))
               for name, d in sorted((lp.dropped_attributes or {}).items()) if isinstance(d, dict)]
    out = (_table("kept attributes", ["attribute", "value", "confidence", "source"], kept, "kept")
           + _table("dropped attributes", ["attribute", "generated", "reason", "verifier preferred", "confidence"],
                    dropped, "dropped"))
    if lp.conflicts:
        out += _table("merchant/image conflicts", ["attribute", "merchant", "image", "confidence"],
                      [(c.get("attribute"), c.get("merchant_value"), c.get("image_value"), c.get("confidence"))
                       for c in lp.conflicts], "conflicts")
    return out


def _thumb(photo: StoredPhoto | None, label: str) -> str:
    if photo is None:
        return f'<span class="thumb" role="img" aria-label="{escape(label)}: no photo"></span>'
    return f'<span class="thumb i{photo.image_id}" role="img" aria-label="{escape(label)}"></span>'


def _duplicates(duplicates: list[Duplicate]) -> str:
    if not duplicates:
        return '<section class="duplicates"><h3>duplicates</h3><p class="small">none found</p></section>'
    items = []
    for d in duplicates:
        detail = [d.method]
        if d.hamming_distance is not None:
            detail.append(f"Hamming {d.hamming_distance}")
        if d.inliers is not None:
            detail.append(f"{d.inliers} inliers")
        if d.decision:
            detail.append(f"merchant: {d.decision}")
        used_by = ", ".join(d.products) or "no product"
        items.append(f'<li class="duplicate" data-method="{escape(d.method)}" data-own-image="{d.own.image_id}" '
                     f'data-other-image="{d.other.image_id}">{_thumb(d.own, "this photo")} ↔ '
                     f'{_thumb(d.other, "duplicate")} {escape(" · ".join(detail))} · used by {escape(used_by)}</li>')
    return f'<section class="duplicates"><h3>duplicates</h3><ul>{"".join(items)}</ul></section>'


def _neighbours(entry: ProductEntry) -> str:
    if not entry.neighbours:
        note = entry.neighbours_note or "none"
        return f'<section class="neighbours"><h3>nearest products</h3><p class="small">{escape(note)}</p></section>'
    items = "".join(_neighbour(rank, n) for rank, n in enumerate(entry.neighbours, 1))
    return f'<section class="neighbours"><h3>nearest products</h3><ol>{items}</ol></section>'


def _neighbour(rank: int, n: Neighbour) -> str:
    return (f'<li class="neighbour" data-external-id="{escape(n.external_id)}" data-distance="{n.distance:.6f}">'
            f"{_thumb(n.photo, n.external_id)}<strong>{rank}. {escape(n.external_id)}</strong><br>"
            f'{escape(n.category)} · distance {n.distance:.4f}<br>'
            f'<span class="small">{escape(n.title[:60])}</span></li>')

