"""The one place configuration is read from the environment.

Every setting is ``ENRICH_<GROUP>__<NAME>`` (for example ``ENRICH_DB__URL``). The README's
configuration table is generated from this module's field descriptions
(``enrich config --markdown``), so the two cannot drift.
"""

from __future__ import annotations

import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDER_SECRETS = {"changeme", "change-me", "password", "secret", "xxx", "todo"}


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("catalog-enrich", appauthor=False))


def default_openmp_wait_policy() -> None:
    """Ask OpenMP to wait passively unless the environment already names a policy.

    Worker processes share the cores with each other (an events/CPU worker's prefork children beside
    a model worker on one box). OpenMP threads that spin while they wait burn the very core the thread
    they wait for needs: measured with infra/bench/bench_embeddings_only.py, the model worker used
    135 ms of CPU per photo spinning against 93 ms passive. libgomp reads the variable once, when torch
    loads, so ``workers/__init__.py`` calls this before anything imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class ModelProfile(StrEnum):
    """Which weights the model stages run with."""

    pretrained = "pretrained"  # real weights from hub id, local directory or s3:// URI
    random_full = "random-full"  # real-size architectures, random weights (benchmarks only)
    tiny = "tiny"  # tiny architectures, random weights, local tokenizers (tests, offline demo)


class DatabaseSettings(BaseModel):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of a Postgres 15+ server with pgvector >= 0.7 "
        "(postgresql+psycopg://user:pass@host/db). Empty: start the embedded PostgreSQL+pgvector.",
    )
    embedded_dir: Path | None = Field(
        None, description="Data directory of the embedded PostgreSQL. Default: <data_dir>/pgdata."
    )
    pool_size: int = Field(5, ge=1, description="Connections kept per process.")
    statement_timeout_ms: int = Field(30_000, ge=0, description="Server-side statement timeout (0 = none).")
    runtime_role: str | None = Field(
        None,
        description="Role the workers switch to after connecting (non-owner, row-level security applies). "
        "Empty: stay the connecting role.",
    )
    admin_role: str | None = Field(
        "enrich_admin",
        description="Role the maintenance commands (backfill, embeddings, status, retrain build-pairs) switch to "
        "after connecting (cross-tenant under row-level security; the login must be granted it). "
        "Empty: stay the connecting role.",
    )
    vector_index_precision: Literal["vector", "halfvec"] = Field(
        "vector",
        description="What the HNSW indexes of a new embedding size are built on (enrich backfill): vector, or "
        "halfvec (half the index size and memory; recall@10 within 0.01 of vector in infra/bench/bench_similarity.py "
        "--halfvec). Stored vectors and returned distances stay single precision.",
    )
    hnsw_m: int = Field(
        24, ge=2, le=100,
        description="HNSW neighbours per node of the embedding indexes (enrich backfill, enrich embeddings reindex). "
        "24 with ef_construction 128 reached recall@10 0.959 at ef_search 100 at 1M x 512, where pgvector's 16 / 64 "
        "reached 0.942 at ef_search 800 (infra/bench/bench_similarity.py); the build takes about three times as long.",
    )
    hnsw_ef_construction: int = Field(
        128, ge=4, le=1000,
        description="HNSW build candidate list of the embedding indexes; at least 2 x ENRICH_DB__HNSW_M.",
    )

    @model_validator(mode="after")
    def _hnsw_graph_is_buildable(self) -> "DatabaseSettings":
        if self.hnsw_ef_construction < 2 * self.hnsw_m:
            raise ValueError("ENRICH_DB__HNSW_EF_CONSTRUCTION must be at least 2 x ENRICH_DB__HNSW_M (pgvector refuses "
                             "to build such an index)")
        return self

    @field_validator("admin_role")
    @classmethod
    def _empty_role_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("url")
    @classmethod
    def _no_placeholder_password(cls, v: str | None) -> str | None:
        if v and "@" in v and "://" in v:
            creds = v.split("://", 1)[1].rsplit("@", 1)[0]
            if ":" in creds and creds.split(":", 1)[1].lower() in _PLACEHOLDER_SECRETS:
                raise ValueError("ENRICH_DB__URL carries a placeholder password; set the real one")
        return v or None


class BrokerSettings(BaseModel):
    url: str | None = Field(
        None,
        description="Celery/kombu broker URL: amqp://… (RabbitMQ, recommended), redis://…, sqs://… "
        "Empty: an embedded SQLite-backed kombu transport under <data_dir> (single machine only).",
    )
    namespace: str = Field(
        "catalog", pattern=r"^[a-z][a-z0-9-]{0,31}$",
        description="Prefix of every exchange and queue name (catalog.events, catalog.gpu, …).",
    )
    quorum_queues: bool = Field(True, description="Declare quorum queues on RabbitMQ (ignored on other brokers).")
    publish_confirm_timeout_s: float = Field(10.0, gt=0, description="Wait for broker publisher confirms.")
    delivery_limit: int = Field(5, ge=1, description="Deliveries before a poison message is dead-lettered.")
    consumer_timeout_s: int = Field(
        1800, ge=60, description="Broker consumer timeout; task hard time limits stay below it."
    )
    visibility_timeout_s: int = Field(
        3600, ge=60, description="Redis/SQS visibility timeout (must exceed the longest task + retries)."
    )


class StorageSettings(BaseModel):
    originals_uri: str | None = Field(
        None,
        description="Where original images are stored content-addressed: a local directory or s3://bucket/prefix. "
        "Default: <data_dir>/originals.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto). Empty: AWS.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    allowed_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets product images may be fetched from (s3://). Empty list: none.",
    )
    allow_file_urls: bool = Field(False, description="Allow file:// image URLs (demo and tests only).")
    file_roots: list[str] = Field(
        default_factory=list, description="With file:// allowed: the only directories files may come from (empty: any).")
    require_merchant_prefix: bool = Field(
        True, description="s3:// image keys must start with <tenant_id>/<merchant_id>/.")
    allow_private_addresses: bool = Field(
        False, description="Allow http(s) image URLs that resolve to private/loopback addresses (tests only)."
    )
    allow_http: bool = Field(False, description="Allow plain http:// image URLs (https:// is always allowed).")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image download accepted.")
    max_pixels: int = Field(40_000_000, ge=10_000, description="Largest decoded image (width*height).")
    max_frames: int = Field(1, ge=1, description="Most frames an image may have.")
    fetch_timeout_s: float = Field(10.0, gt=0, description="Connect/read timeout for one image download.")
    fetch_total_timeout_s: float = Field(30.0, gt=0, description="Wall-clock cap of one image download (slow drip).")
    max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed (each target re-checked).")
    datasets_uri: str | None = Field(
        None, description="Where DPO datasets are written: directory or s3://bucket/prefix. Default: <data_dir>/datasets."
    )


class ModelSettings(BaseModel):
    profile: ModelProfile = Field(ModelProfile.pretrained, description="pretrained | random-full | tiny.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda:0 when available).")
    cache_dir: Path | None = Field(None, description="Where s3:// model URIs are downloaded. Default: <data_dir>/models.")
    detector: str = Field("google/owlv2-base-patch16-ensemble", description="Zero-shot detector: hub id, directory or s3:// URI.")
    vlm: str = Field("HuggingFaceTB/SmolVLM-256M-Instruct", description="Listing VLM: hub id, directory or s3:// URI.")
    clip: str = Field("ViT-B-32/laion2b_s34b_b79k", description="open_clip model 'ARCH/pretrained-tag', directory or s3:// URI.")
    detection_threshold: float = Field(0.2, ge=0, le=1, description="Best box below this score → full-image fallback.")
    crop_padding: float = Field(0.05, ge=0, le=0.5, description="Padding around the detected box, as a fraction of its size.")
    verify_margin: float = Field(0.05, ge=0, le=1, description="CLIP probability margin a visual attribute needs to be kept.")
    max_images: int = Field(4, ge=1, le=16, description=(
        "Photos of a product the GPU stage grounds and embeds (the primary first, then the event's order); those "
        "that show the product vote on attributes and make the product vector."))
    conflict_margin: float = Field(0.5, ge=0, le=1, description=(
        "CLIP probability lead by which the image must contradict a merchant's visual value for the listing to "
        "report a conflict."))
    max_new_tokens: int = Field(1024, ge=16, description=(
        "Ceiling of one generation phase's token budget (attributes, then text); each phase's budget is its "
        "schema's worst case below it. Fields finished past the budget are flagged forced."))
    grammar_threads: int = Field(0, ge=0, description=(
        "Native threads that fill the grammar masks of a batch's rows in parallel at each decoding step "
        "(0 = one per core this process may use; 1 = row by row on the model thread)."))
    grammar_overlap: bool = Field(True, description=(
        "Fill each decoding step's grammar masks on a thread of their own while the model computes that step's "
        "logits, instead of after them (false: one after the other, on the model thread)."))
    unknown_category: str = Field("generic", description="'generic' (use the generic schema) or 'reject' (unsupported_category).")
    pinned: list[str] = Field(default_factory=list, description=(
        "GPU workers: model kinds (detector, vlm, clip) served from this worker's own settings instead of the "
        "registry's active version (a rollback or canary; logged loudly while it differs). Empty: follow the registry."))
    store_uri: str | None = Field(None, description=(
        "Where trained weights are written, content-addressed (<kind>/<revision>/): a directory or s3://bucket/prefix. "
        "Default: <data_dir>/model-store."))
    promotion_margin: float = Field(0.01, ge=0, le=1, description=(
        "How much a listing-model candidate's held-out field accuracy must beat its base's to be promoted."))
    registry_poll_s: float = Field(30.0, gt=0, description=(
        "GPU workers: how often the active model versions are re-read; a promotion or activation is served "
        "from the next batch after that."))

    @field_validator("unknown_category")
    @classmethod
    def _unknown_category(cls, v: str) -> str:
        if v not in {"generic", "reject"}:
            raise ValueError("ENRICH_MODELS__UNKNOWN_CATEGORY must be 'generic' or 'reject'")
        return v

    @field_validator("pinned")
    @classmethod
    def _pinned(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - {"detector", "vlm", "clip"})
        if unknown:
            raise ValueError(f"ENRICH_MODELS__PINNED: unknown model kinds {unknown}; use detector, vlm, clip")
        return sorted(set(v))


class WorkerSettings(BaseModel):
    batch_size: int = Field(8, ge=1, description="GPU stage micro-batch: most products per model call.")
    batch_max_wait_ms: int = Field(200, ge=0, description="GPU stage micro-batch: longest wait to fill a batch.")
    cpu_threads: int = Field(
        1, ge=0, description="torch/OpenCV threads per worker process for CPU work (0 = library default). "
        "One per process avoids oversubscribing cores shared by several workers.")
    max_retries: int = Field(5, ge=0, description="Retries for transient errors (network, S3, database).")
    retry_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles each retry, with full jitter.")
    retry_backoff_max_s: float = Field(300.0, gt=0, description="Largest retry delay.")
    soft_time_limit_s: int = Field(600, ge=1, description="Soft time limit of one task.")
    time_limit_s: int = Field(900, ge=1, description="Hard time limit of one task (below the broker consumer timeout).")
    retrain_interval_s: int = Field(6 * 3600, ge=60, description="How often beat builds DPO preference pairs.")
    retrain_window_days: int = Field(30, ge=1, description="Oldest feedback a retrain run considers.")
    retrain_merchant_cap: int = Field(200, ge=1, description=(
        "Most reviews one merchant contributes per dataset (each gives a pair per generation phase it corrects)."))
    retrain_holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of products held out for evaluation.")
    retrain_settle_s: float = Field(60.0, ge=0, description=(
        "Feedback younger than this is left for the next pair-builder run (review transactions still committing "
        "cannot then appear behind the read position)."))
    embedder_retrain_interval_s: int = Field(0, ge=0, description=(
        "How often beat fine-tunes the clip embedder on newly accepted/edited listings "
        "(catalog.retrain.finetune_embedder, gpu queue); 0 = never (run `enrich retrain embedder`)."))
    embedder_retrain_min_rows: int = Field(64, ge=2, description=(
        "Fewest new embedder-dataset rows a periodic run trains on (fewer: dataset written, no training)."))
    embedder_retrain_epochs: int = Field(5, ge=1, description="Epochs of a periodic embedder fine-tune.")
    reconcile_interval_s: int = Field(900, ge=60, description="How often the coverage reconciler runs.")
    heartbeat_s: int = Field(60, ge=1, description=(
        "How often a running stage task refreshes its claim (its job's updated_at), so the reconciler can tell "
        "a live task from a dead one."))
    stall_after_s: int | None = Field(None, ge=1, description=(
        "A claimed stage whose last heartbeat is older than this is stalled: the reconciler releases the claim "
        "and re-dispatches the stage. At least 2 x HEARTBEAT_S. Empty: max(3 x HEARTBEAT_S, "
        "RETRY_BACKOFF_MAX_S + HEARTBEAT_S), since a task waiting out a retry countdown keeps its claim without "
        "beating."))
    queued_stall_after_s: int = Field(24 * 3600, ge=60, description=(
        "A job whose current stage no task holds (never claimed, or handed on and waiting in the next queue) "
        "is stalled only after this long untouched: a long backlog is not a dead job."))
    enriched_event_version: Literal[1, 2] = Field(2, description=(
        "Contract version of listing.enriched: 2 adds forced_fields, forced_tokens, conflicts and text_checks; "
        "1 publishes the version-1 shape for consumers that validate strictly against it."))

    @model_validator(mode="after")
    def _stall_after_several_beats(self) -> "WorkerSettings":
        if self.stall_after_s is not None and self.stall_after_s < 2 * self.heartbeat_s:
            raise ValueError("ENRICH_WORKERS__STALL_AFTER_S must be at least 2 x ENRICH_WORKERS__HEARTBEAT_S "
                             "(otherwise one late heartbeat makes a live task look dead)")
        return self

    @property
    def stall_allowance_s(self) -> float:
        """How long a claimed stage may go without a heartbeat before the reconciler calls it stalled."""
        if self.stall_after_s is not None:
            return float(self.stall_after_s)
        return float(max(3 * self.heartbeat_s, self.retry_backoff_max_s + self.heartbeat_s))


class RetentionSettings(BaseModel):
    """How long the bookkeeping tables keep what they record (``catalog.prune`` on beat, ``enrich prune``)."""

    enabled: bool = Field(True, description="Beat schedules catalog.prune (bookkeeping retention). Off: nothing is "
                          "ever removed (enrich prune still works by hand).")
    interval_s: int = Field(300, ge=10, description="How often beat runs catalog.prune.")
    batch_size: int = Field(1000, ge=10, le=50_000, description=(
        "Rows per pruning transaction (FOR UPDATE SKIP LOCKED): each batch commits on its own, so no lock or "
        "transaction outlives one batch."))
    max_run_s: float = Field(60.0, gt=0, description=(
        "Time budget of one prune run; what is left waits for the next run."))
    outbox_keep_s: int = Field(24 * 3600, ge=60, description=(
        "Published outbox rows are deleted this long after publishing (default 1 day). Unpublished rows are "
        "never deleted."))
    inbox_keep_s: int = Field(7 * 86400, ge=3600, description=(
        "Idempotency window: an inbox event id is remembered this long (default 7 days), and longer while its "
        "job row is kept or a review recorded from it exists. A replay older than the window is handled as "
        "a new event: the product version guard answers it with listing.failed / stale_version and changes "
        "nothing."))
    jobs_keep_s: int = Field(7 * 86400, ge=3600, description=(
        "Finished jobs (done, failed, superseded) are folded into the hourly job summaries and deleted this "
        "long after they finished (default 7 days). Live jobs are never deleted, nor is a product's newest job "
        "(the reconciler reads it) until a later job of that product replaces it."))
    results_keep_s: int = Field(3600, ge=60, description=(
        "A job's model result document (results/<job_id> in the originals store) is deleted this long after "
        "the job finished (default 1 hour), once its listing is committed; never while the job is live."))
    dead_letters_keep_s: int = Field(30 * 86400, ge=3600, description=(
        "Resolved dead letters (enrich dead-letters replay|discard) are deleted this long after resolution "
        "(default 30 days). Unresolved ones are kept until someone resolves them."))
    summaries_keep_s: int = Field(400 * 86400, ge=86400, description=(
        "Hourly job and intake summaries are kept this long (default 400 days)."))

    @model_validator(mode="after")
    def _jobs_outlive_results(self) -> "RetentionSettings":
        if self.jobs_keep_s < self.results_keep_s:
            raise ValueError("ENRICH_RETENTION__JOBS_KEEP_S must be at least ENRICH_RETENTION__RESULTS_KEEP_S "
                             "(a job row is what tells the pruner which result document to delete)")
        return self


class EnrichmentSettings(BaseModel):
    """Which enrichment stages run (``tasks.pipeline.policy``): per tenant, per category, per both.

    Stage sets are lists of dedup, grounding, listing, verification, embeddings. dedup and embeddings
    always run; listing and verification go together and need grounding. So the choices are every
    stage (default), [dedup, grounding, embeddings] and [dedup, embeddings] (embeddings-only). A product
    event's optional hints.stages can only narrow what applies here."""

    stages: list[str] = Field(default_factory=lambda: ["dedup", "grounding", "listing", "verification", "embeddings"],
                              description="Stages run for any tenant and category not named below (default: all).")
    tenants: dict[str, list[str]] = Field(default_factory=dict, description=(
        'Per tenant, as JSON: {"acme": ["dedup", "embeddings"]}.'))
    categories: dict[str, list[str]] = Field(default_factory=dict, description=(
        'Per category, as JSON: {"socks": ["dedup", "embeddings"]}. A tenant entry wins over a category entry.'))
    tenant_categories: dict[str, list[str]] = Field(default_factory=dict, description=(
        'Per tenant and category, as JSON keyed "TENANT/CATEGORY"; the most specific entry wins.'))

    @model_validator(mode="after")
    def _valid_policies(self) -> "EnrichmentSettings":
        from tasks.pipeline.policy import InvalidPolicy

        try:
            self.table()
        except InvalidPolicy as exc:
            raise ValueError(f"ENRICH_ENRICHMENT__*: {exc}") from None
        return self

    def table(self):  # noqa: ANN201 - tasks.pipeline.policy.PolicyTable (imported lazily: no cycle at import)
        from tasks.pipeline.policy import PolicyTable

        return PolicyTable.of(self.stages, by_tenant=self.tenants, by_category=self.categories,
                              by_tenant_category=self.tenant_categories)


class MetricsSettings(BaseModel):
    """The Prometheus endpoint of each worker process (``workers.metrics``)."""

    enabled: bool = Field(False, description=(
        "Serve Prometheus metrics on every worker role (events, cpu, gpu, beat). Off by default: several roles "
        "on one host need distinct ports."))
    port: int = Field(9410, ge=1, le=65_000, description=(
        "Base port of the metrics endpoint; each role adds its offset: events-only worker +0, cpu (or events,cpu) "
        "+1, gpu +2, beat +3."))
    host: str = Field("0.0.0.0", description="Address the metrics endpoint listens on.")
    multiproc_dir: Path | None = Field(None, description=(
        "Where prefork children write their metric files (one sub-directory per worker process tree, emptied "
        "at its start). Default: <data_dir>/metrics."))
    broker_api_url: str | None = Field(None, description=(
        "RabbitMQ management API for queue depths (http://user:pass@host:15672). Empty: derived from an "
        "amqp:// broker URL (port 15672), falling back to passive queue declares when unreachable."))

    def port_for(self, role: str) -> int:
        return self.port + {"events": 0, "cpu": 1, "gpu": 2, "beat": 3}[role]


def otel_traces_requested() -> bool:
    """Tracing is off unless the standard OTel variables ask for an exporter (and the SDK is not disabled)."""
    import os

    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter == "none":
        return False
    return bool(exporter or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def export_metrics_dir(path: Path) -> None:
    """Multiprocess mode for prometheus_client in this process and the children it forks."""
    import os

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


class FaultSettings(BaseModel):
    """Test-only fault injection (tasks.faults). Every field is off by default; production never
    sets any of them, and ``ENRICH_ENV=production`` refuses to start with one set."""

    kill_after_commit: str | None = Field(
        None, pattern=r"^(fetch|model|persist)$",
        description="TESTS ONLY. SIGKILL the worker process right after this stage's commit, before the ack.",
    )
    crash_on_task_for_external_id: str | None = Field(
        None, description="TESTS ONLY. SIGKILL the worker process on every fetch of this product (a poison message).",
    )
    oom_above_batch: int | None = Field(
        None, ge=1, description="TESTS ONLY. Raise a simulated accelerator out-of-memory error for model batches above this size.",
    )
    sleep_in_model_s: float = Field(
        0.0, ge=0, le=600, description="TESTS ONLY. Sleep this long inside every model batch.",
    )
    sleep_before_persist_commit_s: float = Field(
        0.0, ge=0, le=600, description="TESTS ONLY. Sleep this long inside the persist transaction, before its commit.",
    )
    trace: bool = Field(False, description="TESTS ONLY. Log every fault point reached (fault.point lines).")

    @property
    def active(self) -> bool:
        return any((self.kill_after_commit, self.crash_on_task_for_external_id, self.oom_above_batch,
                    self.sleep_in_model_s, self.sleep_before_persist_commit_s, self.trace))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ENRICH_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    env: str = Field("development", description="development (console logs) or production (JSON logs).")
    log_level: str = Field("INFO", description="Root log level.")
    data_dir: Path = Field(default_factory=default_data_dir, description="Local state: embedded DB, originals, caches.")
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    enrichment: EnrichmentSettings = Field(default_factory=EnrichmentSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    faults: FaultSettings = Field(default_factory=FaultSettings)

    @model_validator(mode="after")
    def _limits_below_consumer_timeout(self) -> "Settings":
        if self.workers.time_limit_s >= self.broker.consumer_timeout_s:
            raise ValueError(
                "ENRICH_WORKERS__TIME_LIMIT_S must stay below ENRICH_BROKER__CONSUMER_TIMEOUT_S "
                "(otherwise the broker closes the channel of a task still running)"
            )
        if self.workers.soft_time_limit_s >= self.workers.time_limit_s:
            raise ValueError("ENRICH_WORKERS__SOFT_TIME_LIMIT_S must be below ENRICH_WORKERS__TIME_LIMIT_S")
        if self.is_production and self.faults.active:
            raise ValueError("ENRICH_FAULTS__* is fault injection for tests; it cannot be set with ENRICH_ENV=production")
        return self

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def embedded_db_dir(self) -> Path:
        return self.db.embedded_dir or self.data_dir / "pgdata"

    @property
    def originals_uri(self) -> str:
        return self.storage.originals_uri or str(self.data_dir / "originals")

    @property
    def datasets_uri(self) -> str:
        return self.storage.datasets_uri or str(self.data_dir / "datasets")

    @property
    def model_cache_dir(self) -> Path:
        return self.models.cache_dir or self.data_dir / "models"

    @property
    def metrics_dir(self) -> Path:
        return self.metrics.multiproc_dir or self.data_dir / "metrics"

    @property
    def model_store_uri(self) -> str:
        return self.models.store_uri or str(self.data_dir / "model-store")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    get_settings.cache_clear()


def export_overrides(**values: str) -> None:
    """Set settings for this process and the worker processes it starts (CLI flags such as
    ``--device``), e.g. ``export_overrides(ENRICH_MODELS__DEVICE="cuda:0")``."""
    import os

    for name, value in values.items():
        if not name.startswith("ENRICH_"):
            raise ValueError(f"not a setting: {name}")
        os.environ[name] = value
    reset_settings_cache()
