"""``enrich backfill`` and ``enrich embeddings list|compare|activate|drop``: blue/green clip versions.

Maintenance commands: every transaction runs in the system scope as the maintenance role
(``admin_session`` on ``get_admin_session_factory()``, ``ENRICH_DB__ADMIN_ROLE``); the HNSW index
DDL needs the table owner and runs on an owner connection (``get_owner_engine()``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import typer

from db import embedding_versions as ev
from db import vector_indexes
from db.engine import admin_session
from workers.cli.errors import CliError, one_line_errors
from workers.settings import Settings, get_settings

embeddings_app = typer.Typer(help="Embedding model versions: list, compare, activate, drop.", no_args_is_help=True)


class ModelEmbedder:
    """Embeds backfill items with a loaded clip wrapper as the pipeline did: every photo the
    pipeline embedded for the listing, each cut exactly as it cut it (its grounding box padded by
    ``crop_padding``, ``models.boxes.padded_crop_box``; the whole photo where the grounding fell back
    or none was made) through the image tower; the product vector by the pipeline's own rule
    (``models.batch.product_vector`` over the photos recorded as showing the product); its stored
    visual text through the text tower. Returns (product vectors, text vectors, photo vectors)."""

    def __init__(self, clip: Any, read_bytes: Any, crop_padding: float) -> None:
        self.clip = clip
        self.read_bytes = read_bytes
        self.crop_padding = crop_padding

    def __call__(self, items: Sequence[ev.BackfillItem]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        from models.batch import product_vector
        from models.boxes import product_crop
        from models.images import decode_image

        # A listing stored without photo rows: its primary photo alone, from the listing's own row.
        photos = [it.photos or (ev.BackfillPhoto(it.image_id, 0, it.storage_uri, it.box, True, None, None),)
                  for it in items]
        # Decoded as fetch decoded it (EXIF orientation applied: the stored box refers to that frame).
        crops = [product_crop(decode_image(self.read_bytes(p.storage_uri)).image, p.box, self.crop_padding)
                 for ps in photos for p in ps]
        vectors = self.clip.embed_images(crops) if crops else np.zeros((0, 0), dtype=np.float32)
        per_item, start = [], 0
        for ps in photos:
            per_item.append(vectors[start:start + len(ps)])
            start += len(ps)
        products = np.stack([product_vector([v for v, p in zip(vs, ps) if p.on_product or p.position == 0])
                             for vs, ps in zip(per_item, photos)]).astype(np.float32)
        texts = self.clip.embed_texts([i.text_input for i in items])
        # Photo vectors only for the photos the listing recorded (none for a listing without rows).
        return products, texts, [vs if it.photos else vs[:0] for vs, it in zip(per_item, items)]


def load_embedder(model: str, settings: Settings, profile: str = "pretrained") -> tuple[ev.VersionSpec, ev.EmbedBatch]:
    """The clip model named ``model`` (same reference forms as ENRICH_MODELS__CLIP), loaded once.
    ``profile`` is the clip's own (a backfill loads real weights unless told otherwise), whatever
    the rest of this installation's models use."""
    try:
        from dataclasses import replace

        from models.factory import build_models
        from tasks.io.blobs import open_blob_store
        from workers.wiring import model_config
        from workers.storage import s3_client
    except ModuleNotFoundError as exc:
        raise CliError(f"the model layer is not installed ({exc.name}); cannot compute embeddings") from exc
    base = model_config(settings)
    bundle = build_models(replace(base, clip=model,
                                  kind_profiles=tuple(sorted({**dict(base.kind_profiles), "clip": profile}.items()))))
    clip = bundle.embedder
    clip.load()
    info = clip.version()
    if not info.dims:
        raise CliError(f"clip model {model} reports no embedding dimension")
    blobs = open_blob_store(settings.originals_uri, s3_client_factory=lambda: s3_client(settings))
    spec = ev.VersionSpec(name=info.name, revision=info.revision, dims=int(info.dims), profile=info.profile,
                          random_weights=info.random_weights, params={"ref": model},
                          weights_uri=model if info.profile == "pretrained" else None)
    return spec, ModelEmbedder(clip, blobs.get, settings.models.crop_padding)


def _factory():  # noqa: ANN202
    from workers.database import get_admin_session_factory

    return get_admin_session_factory()


def _as_owner(ddl: Any, dims: int) -> list[str]:
    """Index DDL on a fresh owner connection: CREATE/DROP INDEX needs the table owner."""
    from workers.database import get_owner_engine

    engine = get_owner_engine()
    try:
        return ddl(engine, dims)
    finally:
        engine.dispose()


def configured_graph(settings: Any) -> vector_indexes.HnswGraph:
    """The HNSW graph every embedding index is built with (``ENRICH_DB__HNSW_M`` / ``_EF_CONSTRUCTION``)."""
    return vector_indexes.HnswGraph(settings.db.hnsw_m, settings.db.hnsw_ef_construction)


def ensure_size_indexes(settings: Any, dims: int) -> list[str]:
    """The size's HNSW indexes as the settings say (precision and graph), on a fresh owner connection,
    CONCURRENTLY (writers keep writing; a graph change is rebuilt beside and swapped in, so searches
    keep an index; a precision change drops and builds, exact scans meanwhile). The one way
    the backfill, the embedder rollout and ``enrich embeddings reindex`` build them."""
    graph, precision = configured_graph(settings), settings.db.vector_index_precision
    return _as_owner(lambda engine, d: vector_indexes.ensure_dimension_index(engine, d, precision, graph), dims)


def backfill(
    model: str = typer.Option(..., "--model", help="Clip model reference: ARCH/pretrained-tag, directory or s3:// URI."),
    batch_size: int = typer.Option(64, min=1, help="Listings per model call and per committed transaction."),
    rate: float = typer.Option(0.0, min=0, help="Most rows per second (0 = unlimited), to spare the database."),
    limit: int = typer.Option(0, min=0, help="Stop after this many rows (0 = all); run again to resume."),
    profile: str = typer.Option("pretrained", help="The clip's weights: pretrained (from --model), or tiny / "
                                                   "random-full (random weights, for rehearsals)."),
) -> None:
    """Embed every searchable listing with a new clip version, beside the active one (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with one_line_errors():
        settings = get_settings()
        spec, embed = load_embedder(model, settings, profile)
        factory = _factory()
        with admin_session(factory) as s:
            version_id = ev.register_version(s, spec)
        created = ensure_size_indexes(settings, spec.dims)
        if created:
            typer.echo(f"created HNSW indexes {', '.join(created)}")
        with admin_session(factory) as s:
            start = ev.coverage(s, version_id)
        todo = start.target - start.embedded if not limit else min(limit, start.target - start.embedded)
        with Progress(TextColumn(f"backfill clip version {version_id}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn()) as bar:
            task = bar.add_task("rows", total=max(todo, 0))
            report = ev.run_backfill(factory, version_id, embed, batch_size=batch_size,
                                     max_rows_per_s=rate or None, limit=limit or None,
                                     on_progress=lambda done, _start: bar.update(task, completed=done))
    cov = report.coverage
    typer.echo(f"version {version_id} ({spec.name}@{spec.revision}, {spec.dims} dims): wrote {report.written} rows "
               f"in {report.seconds:.1f}s; coverage {cov.embedded}/{cov.target} ({cov.ratio:.1%})")


@embeddings_app.command("list")
def list_versions() -> None:
    """Clip model versions with their status, size and row counts."""
    with one_line_errors(), admin_session(_factory()) as s:
        versions = ev.list_versions(s)
    for v in versions:
        compare = v.metrics.get("compare", {})
        recall = compare.get("recall_at_10")
        extra = f"  coverage {compare['coverage']:.1%} recall@10 {recall:.3f}" if recall is not None else ""
        typer.echo(f"{v.id:>4}  {v.status:<11} {v.dims or '-':>5}d  {v.rows:>9} rows  {v.name}@{v.revision}{extra}")


@embeddings_app.command("compare")
def compare(version_id: int = typer.Argument(..., help="Clip model version id (see `enrich embeddings list`)."),
            queries: int = typer.Option(100, min=1, help="Sampled query rows."),
            k: int = typer.Option(10, min=1, max=100),
            ef_search: int = typer.Option(40, min=1, help="hnsw.ef_search for the approximate side.")) -> None:
    """Coverage and recall@k of the version's HNSW neighbours against exact search."""
    with one_line_errors(), admin_session(_factory()) as s:
        result = ev.compare(s, version_id, k=k, queries=queries, ef_search=ef_search)
    recall = "n/a (no rows)" if result.recall_at_k is None else f"{result.recall_at_k:.3f}"
    cov = result.coverage
    typer.echo(f"version {version_id}: coverage {cov.embedded}/{cov.target} ({cov.ratio:.1%}); "
               f"recall@{k} {recall} over {result.queries} queries at ef_search={ef_search}")


@embeddings_app.command("activate")
def activate(version_id: int = typer.Argument(...),
             force: bool = typer.Option(False, "--force", help="Activate below 100% coverage, without index, or a "
                                        "fine-tuned candidate without a passing gate decision (never a version "
                                        "that covers no listing).")) -> None:
    """Switch SQL searches to this version, atomically (one transaction)."""
    with one_line_errors():
        try:
            with admin_session(_factory()) as s:
                old = ev.activate(s, version_id, force=force)
        except ev.VersionError as exc:
            raise CliError(str(exc)) from exc
    typer.echo(f"clip version {version_id} is active" + (f"; version {old} retired" if old else ""))


@embeddings_app.command("index-categories")
def index_categories(min_rows: int = typer.Option(1000, min=1, help="Only categories with at least this many rows "
                                                                    "(smaller ones are answered by an exact scan).")) -> None:
    """Per-category partial HNSW indexes for the active version's size (faster category-filtered searches;
    a second copy of the image index). Idempotent; run again after new categories arrive."""
    with one_line_errors():
        with admin_session(_factory()) as s:
            version_id = ev.active_version_id(s)
            if version_id is None:
                raise CliError("no active clip version; activate one first")
            dims = int(ev.get_version(s, version_id).dims or 0)
            counts = ev.category_counts(s, version_id)
        chosen = sorted(c for c, n in counts.items() if n >= min_rows)
        graph = configured_graph(get_settings())
        created = _as_owner(lambda engine, d: vector_indexes.ensure_category_indexes(engine, d, chosen, graph), dims)
    typer.echo(f"{len(chosen)} of {len(counts)} categories have at least {min_rows} rows; "
               f"created {len(created)} indexes" + (f": {', '.join(created)}" if created else ""))


@embeddings_app.command("reindex")
def reindex() -> None:
    """Bring the active clip size's HNSW indexes to the configured precision and graph
    (ENRICH_DB__VECTOR_INDEX_PRECISION, ENRICH_DB__HNSW_M, ENRICH_DB__HNSW_EF_CONSTRUCTION), CONCURRENTLY.
    Idempotent: an index that already matches is left alone; run again after an interrupted run."""
    with one_line_errors():
        settings = get_settings()
        with admin_session(_factory()) as s:
            version_id = ev.active_version_id(s)
            if version_id is None:
                raise CliError("no active clip version; activate one first")
            dims = int(ev.get_version(s, version_id).dims or 0)
        started = time.monotonic()
        rebuilt = ensure_size_indexes(settings, dims)
    graph = f"m={settings.db.hnsw_m}, ef_construction={settings.db.hnsw_ef_construction}"
    if rebuilt:
        typer.echo(f"rebuilt {', '.join(rebuilt)} ({settings.db.vector_index_precision}, {graph}) "
                   f"in {time.monotonic() - started:.1f}s")
    else:
        typer.echo(f"the {dims}-dim indexes already are {settings.db.vector_index_precision}, {graph}")


@embeddings_app.command("drop")
def drop(version_id: int = typer.Argument(...),
         yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation.")) -> None:
    """Delete a non-active version's embeddings (in batches) and its dimension index if now unused."""
    if not yes:
        typer.confirm(f"delete every embedding of clip version {version_id}?", abort=True)
    with one_line_errors():
        factory = _factory()
        total = 0
        try:
            while True:
                with admin_session(factory) as s:
                    n = ev.delete_version_rows(s, version_id)
                total += n
                if n == 0:
                    break
            with admin_session(factory) as s:
                dims = ev.get_version(s, version_id).dims
                unused = dims is not None and not ev.dims_still_used(s, dims, except_version=version_id)
        except ev.VersionError as exc:
            raise CliError(str(exc)) from exc
        dropped = _as_owner(vector_indexes.drop_dimension_index, dims) if unused and dims else []
    typer.echo(f"deleted {total} embeddings of version {version_id}"
               + (f"; dropped {', '.join(dropped)}" if dropped else ""))


def register(app: typer.Typer) -> None:
    app.command("backfill")(backfill)
    app.add_typer(embeddings_app, name="embeddings")
