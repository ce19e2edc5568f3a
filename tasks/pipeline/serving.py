"""What a GPU worker serves: the registry's active model versions, followed between batches.

The active row of each kind in ``model_versions`` is the source of truth. A GPU worker's model
thread asks ``ModelServer.serving()`` before every batch; at most every ``poll_s`` seconds that
reads the registry, and when a promotion or activation changed an active version it builds a
bundle for the new versions (loaded on its first batch) and swaps it in. In-flight work is never
dropped: the batch that is running finishes on the bundle it started with.

Kinds listed in ``pinned`` are served from the worker's own configuration instead (a rollback
or a canary), with a warning on every poll while they differ from the active version.

Every result is stamped with the ids of the versions that produced it; persist records those,
so no other process needs weights, torch or a model identity of its own. On a first deployment
(no active version of a kind) the configured version is registered and activated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import system_session
from db.repositories import model_versions
from models.config import ModelConfig

if TYPE_CHECKING:
    from models.batch import ModelItem, ModelResult
    from models.factory import ModelBundle

log = structlog.get_logger(__name__)

KINDS = ("detector", "vlm", "clip")


@dataclass(frozen=True)
class VersionRef:
    """A registry row, as much of it as loading needs."""

    id: int
    kind: str
    name: str
    revision: str
    profile: str
    weights_uri: str | None
    random_weights: bool

    @property
    def canonical(self) -> str:
        return f"{self.name}@{self.revision}"


def version_ref(row: Any) -> VersionRef:
    return VersionRef(row.id, row.kind, row.name, row.revision, row.profile, row.weights_uri, row.random_weights)


def config_for(base: ModelConfig, versions: Mapping[str, VersionRef]) -> ModelConfig:
    """The configuration that loads exactly these registry versions. Pretrained versions load from
    their weights URI (or their name, which is the reference they were registered under); random-init
    versions are rebuilt from the base configuration's architecture and seed."""
    refs: dict[str, str] = {}
    profiles = dict(base.kind_profiles)
    for kind, version in versions.items():
        profiles[kind] = version.profile
        if version.profile == "pretrained":
            refs[kind] = version.weights_uri or version.name
    return replace(base, kind_profiles=tuple(sorted(profiles.items())), **refs)


def weights_uris(config: ModelConfig) -> dict[str, str | None]:
    """Where each configured kind's weights are, for the registry (None for random-init builds)."""
    return {kind: (config.ref_of(kind) if config.profile_of(kind) == "pretrained" else None) for kind in KINDS}


@dataclass(frozen=True)
class Served:
    bundle: ModelBundle
    versions: dict[str, VersionRef]

    @property
    def ids(self) -> dict[str, int]:
        return {kind: v.id for kind, v in self.versions.items()}

    @property
    def random_weights(self) -> bool:
        return any(v.random_weights for v in self.versions.values())


class ModelServer:
    def __init__(self, session_factory: sessionmaker[Session], base: ModelConfig,
                 build: Callable[[ModelConfig], ModelBundle], *, pinned: frozenset[str] = frozenset(),
                 poll_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        unknown = set(pinned) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown model kinds to pin: {sorted(unknown)}; expected some of {KINDS}")
        self._factory = session_factory
        self._base = base
        self._build = build
        self._pinned = frozenset(pinned)
        self._poll_s = poll_s
        self._clock = clock
        self._lock = threading.Lock()
        self._served: Served | None = None
        self._checked_at = float("-inf")
        self.switches = 0

    def serving(self) -> Served:
        """The bundle to run the next batch on (re-read from the registry when a poll is due)."""
        with self._lock:
            if self._served is None or self._clock() - self._checked_at >= self._poll_s:
                self._refresh()
            assert self._served is not None
            return self._served

    def prepare(self) -> None:
        """Load the served bundle's models (a no-op once loaded): the micro-batcher calls this before
        a batch, outside the batch's hang allowance."""
        bundle = self.serving().bundle
        for wrapper in (bundle.grounder, bundle.embedder, bundle.generator):
            wrapper.load()

    def run_batch(self, items: list[ModelItem], *,
                  before: Callable[[list[ModelItem]], None] | None = None) -> list[ModelResult]:
        """One batch on the served bundle, every result stamped with the versions that made it."""
        from models.batch import run_model_batch

        served = self.serving()
        known = self._known(items, served)
        results = run_model_batch(served.bundle, items, before=before, known=known)
        for result in results:
            result.model_versions = served.ids
            result.random_weights = served.random_weights
        return results

    def _known(self, items: list[ModelItem], served: Served) -> dict[tuple[int, str], Any]:
        """Stage-level reuse: what earlier jobs derived from these photos under the versions served
        now (a grounding per prompt, its crop's vector), by (image id, prompt). One query per batch;
        the batch grounds and embeds only what is not there. A lookup failure costs only the reuse."""
        from db.repositories import listings

        ids = sorted({i for item in items for i in item.image_ids})
        if not ids or "detector" not in served.versions or "clip" not in served.versions:
            return {}
        try:
            with system_session(self._factory) as session:
                rows = listings.known_photos(session, ids, detector_id=served.versions["detector"].id,
                                             clip_id=served.versions["clip"].id)
        except Exception:  # noqa: BLE001 - the batch recomputes; the database error shows elsewhere
            log.warning("serving.known_photos_unavailable", exc_info=True)
            return {}
        return {(r.image_id, r.prompt): r for r in rows}

    def _refresh(self) -> None:
        wanted = self._wanted()
        self._checked_at = self._clock()
        if self._served is not None and self._served.ids == {k: v.id for k, v in wanted.items()}:
            return
        bundle = self._build(config_for(self._base, wanted))
        served = Served(bundle, self._checked(bundle, wanted))
        if self._served is not None:
            self.switches += 1
            log.warning("models.switched", old={k: v.canonical for k, v in self._served.versions.items()},
                        new={k: v.canonical for k, v in served.versions.items()})
        else:
            log.info("models.serving", versions={k: v.canonical for k, v in served.versions.items()},
                     pinned=sorted(self._pinned))
        self._served = served

    def _wanted(self) -> dict[str, VersionRef]:
        """The active version of each kind, or the configured one for pinned kinds (registered, and
        activated where a kind has no active version yet). Two GPU workers of a first deployment
        may both try to activate: the one-active index refuses the second, which reads again."""
        try:
            return self._read_wanted()
        except IntegrityError:
            log.info("models.registration_raced")
            return self._read_wanted()

    def _read_wanted(self) -> dict[str, VersionRef]:
        with system_session(self._factory) as session:
            active = model_versions.active(session)
            need = [k for k in KINDS if k in self._pinned or k not in active]
            if need:
                configured = self._build(self._base).versions()
                ids = model_versions.ensure_model_versions(
                    session, {k: configured[k] for k in need}, {k: weights_uris(self._base)[k] for k in need})
                active = model_versions.active(session)
                rows = {r.id: r for r in model_versions.by_ids(session, set(ids.values()))}
                pinned_rows = {k: rows[ids[k]] for k in need if k in self._pinned}
            else:
                pinned_rows = {}
            wanted = {k: version_ref(pinned_rows[k] if k in pinned_rows else active[k]) for k in KINDS}
        for kind in sorted(self._pinned):
            if wanted[kind].id != active[kind].id:
                log.warning("models.pinned_differs_from_active", kind=kind, serving=wanted[kind].canonical,
                            active=f"{active[kind].name}@{active[kind].revision}")
        return wanted

    def _checked(self, bundle: ModelBundle, wanted: dict[str, VersionRef]) -> dict[str, VersionRef]:
        """The versions the bundle really is. When the weights behind a row changed (its identity no
        longer matches), results are attributed to what was loaded, registered as its own row."""
        actual = bundle.versions()
        mismatched = {k for k, v in wanted.items() if (actual[k].name, actual[k].revision) != (v.name, v.revision)}
        if not mismatched:
            return wanted
        log.error("models.registry_mismatch", kinds=sorted(mismatched),
                  wanted={k: wanted[k].canonical for k in mismatched},
                  loaded={k: f"{actual[k].name}@{actual[k].revision}" for k in mismatched})
        with system_session(self._factory) as session:
            ids = model_versions.ensure_model_versions(session, {k: actual[k] for k in mismatched})
            rows = {r.id: r for r in model_versions.by_ids(session, set(ids.values()))}
        return {k: (version_ref(rows[ids[k]]) if k in mismatched else v) for k, v in wanted.items()}
