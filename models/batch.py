"""The GPU stage as one pure batch function, its out-of-memory splitting, and the micro-batcher.

``run_model_batch`` takes what a batch of products needs (decoded images, merchant text) and runs
ground → describe → verify → embed once for all of them. One item's bad input is that item's
error; an accelerator OOM halves the batch and retries the halves, down to one item
(``halve_on_oom``, the one splitting rule every model wrapper uses too). Items whose enrichment
policy has no listing (``ModelItem.stages``) are only embedded, in the same batch (``_run_embeddings``).

``MicroBatcher`` feeds it: each Celery task thread submits one item, one model thread runs
batches of up to ``max_size`` items, waiting at most ``max_wait_ms`` for a batch to fill.

This module imports no torch at import time (the pipeline imports ``ModelItem`` from here in
processes that never run a model); the model stack is imported inside ``run_model_batch``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog

from models.oom import halve_on_oom, is_oom

if TYPE_CHECKING:
    from models.factory import ModelBundle

In = TypeVar("In")
Out = TypeVar("Out")

log = structlog.get_logger(__name__)

OOM_CODE = "model_out_of_memory"
MODEL_ERROR_CODE = "model_error"


@dataclass
class ModelItem:
    job_id: int
    image: Any  # PIL.Image (RGB), decoded once in the task thread
    category: str
    title: str
    description: str
    attributes: dict[str, Any]
    locale: str
    unknown_category: str = "generic"
    # The product's other photos (decoded, in the event's order) and every photo's image id, the
    # primary's first; each is grounded and embedded, and those that show the product vote.
    extra_images: list[Any] = field(default_factory=list)
    image_ids: tuple[int, ...] = ()
    # The enrichment stages to run (``tasks.pipeline.policy``); None: all of them. Without "listing"
    # the item is embedded only (``_run_embeddings``): no VLM call, and no detector call either
    # unless "grounding" is in the set.
    stages: frozenset[str] | None = None


@dataclass
class ModelResult:
    job_id: int
    error: tuple[str, str, bool] | None = None  # (code, detail, retryable)
    schema_id: str | None = None
    grounding: dict[str, Any] = field(default_factory=dict)
    model_output: dict[str, Any] = field(default_factory=dict)
    model_input: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)
    image_embedding: list[float] = field(default_factory=list)
    text_embedding: list[float] = field(default_factory=list)
    text_input: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    # What a consumer must know to trust the words: fields completed past the token budget
    # ("title", "description", "attributes.<name>"; forced attributes are dropped, never kept),
    # merchant values the image contradicts, and what the truth check did to the text.
    forced_fields: list[str] = field(default_factory=list)
    forced_tokens: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    text_checks: dict[str, Any] = field(default_factory=dict)
    # One entry per photo, the primary's first: {"image_id", "position", "on_product",
    # "product_probability", "grounding", "embedding"}. ``image_embedding`` above is the product
    # vector: the normalised mean of the photos that show the product.
    images: list[dict[str, Any]] = field(default_factory=list)
    # Stage-level reuse: photos whose grounding / crop vector an earlier job derived under the
    # served versions (``tasks.pipeline.serving``), so this batch did not recompute them.
    reused: dict[str, int] = field(default_factory=dict)
    # Stamped by whoever ran the batch: the registry ids of the versions that produced this result
    # ({"detector": …, "vlm": …, "clip": …}) and whether any of them has random weights.
    model_versions: dict[str, int] = field(default_factory=dict)
    random_weights: bool = False
    # The enrichment stages that ran for this item (sorted); empty in results written before policies.
    stages: list[str] = field(default_factory=list)


def _free_accelerator_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


ALL_STAGES = frozenset({"dedup", "grounding", "listing", "verification", "embeddings"})


def _stages(item: ModelItem) -> frozenset[str]:
    return ALL_STAGES if item.stages is None else item.stages


def _run(models: ModelBundle, items: list[ModelItem], before: Callable[[list[ModelItem]], None] | None,
         known: dict[tuple[int, str], Any] | None = None) -> list[ModelResult]:
    """The batch split by policy: items that get a listing run the whole chain, the others are
    embedded only; one result per item, in order."""
    if before is not None:
        before(items)
    lite = [k for k, item in enumerate(items) if "listing" not in _stages(item)]
    full = [k for k, item in enumerate(items) if "listing" in _stages(item)]
    results: list[ModelResult | None] = [None] * len(items)
    for part, run in ((full, _run_full), (lite, _run_embeddings)):
        if part:
            for k, result in zip(part, run(models, [items[k] for k in part], known), strict=True):
                result.stages = sorted(_stages(items[k]))
                results[k] = result
    return [r for r in results if r is not None]


def _resolve_schemas(items: list[ModelItem], results: list[ModelResult]) -> tuple[list[int], list[Any]]:
    """The category schema of each item; an item whose category cannot be served gets its error
    on its result and is left out. Returns (indexes of the items kept, their schemas)."""
    from models.categories import resolve_schema
    from models.errors import ModelLayerError

    live: list[int] = []
    schemas = []
    for idx, item in enumerate(items):
        try:
            schemas.append(resolve_schema(item.category, unknown=item.unknown_category))
            live.append(idx)
        except ModelLayerError as exc:
            results[idx].error = (exc.code, exc.detail, exc.retryable)
    return live, schemas


def _run_full(models: ModelBundle, items: list[ModelItem],
              known: dict[tuple[int, str], Any] | None = None) -> list[ModelResult]:
    import numpy as np

    from models.embeddings import visual_description
    from models.listing import ListingRequest, combine

    results = [ModelResult(job_id=i.job_id) for i in items]
    live, schemas = _resolve_schemas(items, results)
    if not live:
        return results
    photos = [(n, p, img) for n, i in enumerate(live) for p, img in enumerate([items[i].image, *items[i].extra_images])]
    clock = _Clock()
    reused = [_known_photo(known or {}, items[live[n]], p, schemas[n].name) for n, p, _ in photos]
    grounded, crop_vectors = _ground_and_embed(models, photos, [s.name for s in schemas], reused)
    clock.lap("ground")
    shows = models.verifier.shows_product(crop_vectors, [schemas[n].name for n, _, _ in photos])
    per_product: list[list[int]] = [[] for _ in live]
    for k, (n, _, _) in enumerate(photos):
        per_product[n].append(k)
    product_vectors = [product_vector([crop_vectors[k] for k in ks if k == ks[0] or shows[k][0]]) for ks in per_product]
    clock.lap("embed")
    crops = [grounded[ks[0]].crop for ks in per_product]  # the listing model reads the primary crop
    groundings = [grounded[ks[0]] for ks in per_product]
    requests = [ListingRequest(image=crops[n], schema=schemas[n], merchant_title=items[i].title,
                               merchant_description=items[i].description, merchant_attributes=items[i].attributes,
                               locale=items[i].locale) for n, i in enumerate(live)]
    attributes = models.generator.describe_attributes(requests)
    clock.lap("describe")
    verified = models.verifier.verify(crops, [{"attributes": a.output} for a in attributes], schemas,
                                      [items[i].attributes for i in live], forced=[a.forced_fields for a in attributes],
                                      image_vectors=product_vectors)
    clock.lap("verify")
    texts = write_checked_text(models.generator, requests, [v.facts(s) for v, s in zip(verified, schemas)])
    clock.lap("describe")
    embed_texts = [visual_description(schemas[n].name, v.embedding_facts) for n, v in enumerate(verified)]
    text_vecs = models.embedder.embed_texts(embed_texts)
    image_vecs = product_vectors
    clock.lap("embed")
    # The embedder's zero-shot category against the merchant's: a confident disagreement is reported
    # like any other merchant/image conflict (the merchant's category stays).
    category_votes = models.verifier.category_checks(np.asarray(image_vecs), [s.name for s in schemas])
    clock.lap("verify")
    random_weights = models.generator.identity().random_weights
    timings = clock.shares(len(live))
    for n, i in enumerate(live):
        g, a, checked = groundings[n], attributes[n], texts[n]
        listing = combine(requests[n], a, checked.phase,
                          models.generator.model_input(requests[n], {"attributes": a, "text": checked.phase}),
                          random_weights=random_weights)
        content = {**verified[n].content, "title": checked.title, "description": checked.description}
        results[i] = ModelResult(
            job_id=items[i].job_id, schema_id=schemas[n].schema_id,
            grounding=_grounding(g),
            model_output=listing.output, model_input=listing.model_input,
            content=content, dropped=verified[n].dropped,
            image_embedding=[float(x) for x in image_vecs[n]], text_embedding=[float(x) for x in text_vecs[n]],
            text_input=embed_texts[n], timings_ms=timings, forced_fields=list(listing.forced_fields),
            forced_tokens=listing.forced_tokens, text_checks=checked.report,
            conflicts=[*verified[n].conflicts, *category_conflict(category_votes[n], items[i].category)],
            images=[_photo(items[i], photos[k][1], grounded[k], crop_vectors[k], shows[k]) for k in per_product[n]],
            reused={"groundings": sum(reused[k] is not None for k in per_product[n]),
                    "embeddings": sum(reused[k] is not None and reused[k].embedding is not None
                                      for k in per_product[n])},
        )
    return results


def category_conflict(vote: dict[str, Any] | None, merchant_category: str) -> list[dict[str, Any]]:
    """A category mismatch as a merchant/image conflict entry (``attribute`` = ``category``), or
    nothing: no vote (no schema for the category) or no confident disagreement."""
    if not vote or not vote["mismatch"]:
        return []
    return [{"attribute": "category", "merchant_value": merchant_category, "image_value": vote["predicted"],
             "confidence": vote["probability"]}]


def _run_embeddings(models: ModelBundle, items: list[ModelItem],
                    known: dict[tuple[int, str], Any] | None = None) -> list[ModelResult]:
    """Embeddings only: every photo's vector (of the grounded crop where the policy grounds, else of
    the whole photo), the product vector as their normalised mean (nothing verifies which photos show
    the product), and the text vector of the merchant's own title and attributes. No VLM call."""
    results = [ModelResult(job_id=i.job_id) for i in items]
    live, schemas = _resolve_schemas(items, results)
    if not live:
        return results
    clock = _Clock()
    photos = [(n, p, img) for n, i in enumerate(live) for p, img in enumerate([items[i].image, *items[i].extra_images])]
    grounds = [k for k, (n, _, _) in enumerate(photos) if "grounding" in _stages(items[live[n]])]
    whole = [k for k, (n, _, _) in enumerate(photos) if "grounding" not in _stages(items[live[n]])]
    groundings: dict[int, Any] = {}
    vectors: list[Any] = [None] * len(photos)
    if grounds:
        sub = [photos[k] for k in grounds]
        reused = [_known_photo(known or {}, items[live[n]], p, schemas[n].name) for n, p, _ in sub]
        grounded, crop_vectors = _ground_and_embed(models, sub, [s.name for s in schemas], reused)
        for j, k in enumerate(grounds):
            groundings[k], vectors[k] = grounded[j], crop_vectors[j]
    clock.lap("ground")
    for k, v in zip(whole, models.embedder.embed_images([photos[k][2] for k in whole]) if whole else []):
        vectors[k] = v
    per_product: list[list[int]] = [[] for _ in live]
    for k, (n, _, _) in enumerate(photos):
        per_product[n].append(k)
    texts = [merchant_embedding_text(schemas[n].name, items[i].title, items[i].attributes) for n, i in enumerate(live)]
    text_vecs = models.embedder.embed_texts(texts)
    clock.lap("embed")
    timings = clock.shares(len(live))
    for n, i in enumerate(live):
        item, ks = items[i], per_product[n]
        item_vector = product_vector([vectors[k] for k in ks])
        results[i] = ModelResult(
            job_id=item.job_id, schema_id=schemas[n].schema_id,
            grounding=_grounding(groundings[ks[0]]) if ks[0] in groundings else {},
            content=merchant_content(item), image_embedding=[float(x) for x in item_vector],
            text_embedding=[float(x) for x in text_vecs[n]], text_input=texts[n], timings_ms=timings,
            images=[_embedded_photo(item, photos[k][1], groundings.get(k), vectors[k]) for k in ks])
    return results


def merchant_embedding_text(category: str, title: str, attributes: dict[str, Any]) -> str:
    """What an embeddings-only product's text vector encodes: the merchant's own title and attribute
    values (nothing was generated or verified), or the category alone when the merchant gave neither."""
    facts = [f"{k.replace('_', ' ')} {v}" for k, v in sorted(attributes.items()) if str(v).strip()]
    head = title.strip() or f"a {category.replace('_', ' ')}"
    return (head + (", " + ", ".join(facts) if facts else ""))[:500]


def merchant_content(item: ModelItem) -> dict[str, Any]:
    """The record an embeddings-only product gets in place of a generated listing: the merchant's own
    words and attributes, every attribute marked as the merchant's."""
    return {"title": item.title, "description": item.description,
            "attributes": {k: {"value": v, "confidence": 1.0, "source": "merchant"}
                           for k, v in sorted(item.attributes.items())}}


def _embedded_photo(item: ModelItem, position: int, g: Any, vector: Any) -> dict[str, Any]:
    image_id = item.image_ids[position] if position < len(item.image_ids) else None
    return {"image_id": image_id, "position": position, "on_product": True, "product_probability": None,
            "grounding": _grounding(g) if g is not None else None, "embedding": [float(x) for x in vector]}


def _known_photo(known: dict[tuple[int, str], Any], item: ModelItem, position: int, category: str) -> Any:
    from models.prompts import detection_prompt

    if position >= len(item.image_ids):
        return None
    return known.get((item.image_ids[position], detection_prompt(category)))


def _ground_and_embed(models: ModelBundle, photos: list[tuple[int, int, Any]], categories: list[str],
                      reused: list[Any]) -> tuple[list[Any], Any]:
    """Every photo's grounding and crop vector: taken from an earlier job where the served versions
    already derived them (stage-level reuse: the crop is cut again from the stored box), computed
    in one detector call and one CLIP call for the rest."""
    import numpy as np

    from models.boxes import product_crop
    from models.grounding import GroundingResult

    todo = [k for k, r in enumerate(reused) if r is None]
    fresh = dict(zip(todo, models.grounder.predict([photos[k][2] for k in todo],
                                                   categories=[categories[photos[k][0]] for k in todo]))) if todo else {}
    grounded: list[Any] = []
    for k, (_, _, img) in enumerate(photos):
        if k in fresh:
            grounded.append(fresh[k])
            continue
        r = reused[k]
        box = tuple(r.box) if r.box else None
        crop = product_crop(img, None if r.fallback else box, models.grounder.padding)
        grounded.append(GroundingResult(box=box, score=r.score, fallback=r.fallback, prompt=r.prompt, crop=crop))
    embed = [k for k, r in enumerate(reused) if r is None or r.embedding is None]
    vectors: list[Any] = [None] * len(photos)
    for k, v in zip(embed, models.embedder.embed_images([grounded[k].crop for k in embed]) if embed else []):
        vectors[k] = v
    for k, r in enumerate(reused):
        if vectors[k] is None:
            vectors[k] = np.asarray(r.embedding, dtype=np.float32)
    return grounded, np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def _grounding(g: Any) -> dict[str, Any]:
    return {"box": list(g.box) if g.box else None, "score": g.score, "fallback": g.fallback, "prompt": g.prompt}


def _photo(item: ModelItem, position: int, g: Any, vector: Any, shows: tuple[bool, float]) -> dict[str, Any]:
    image_id = item.image_ids[position] if position < len(item.image_ids) else None
    return {"image_id": image_id, "position": position, "on_product": position == 0 or shows[0],
            "product_probability": shows[1], "grounding": _grounding(g), "embedding": [float(x) for x in vector]}


def product_vector(vectors: list[Any]) -> Any:
    """A product's vector: the unit-length mean of the vectors of its photos that show it (the
    primary photo always does). The one rule for the pipeline and the embedding backfill."""
    import numpy as np

    mean = np.mean(np.stack(vectors), axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


class _Clock:
    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._last) * 1000
        self._last = now

    def shares(self, n: int) -> dict[str, float]:
        return {k: v / n for k, v in self.ms.items()}


@dataclass
class CheckedText:
    """Phase two's result after the truth check (``models.truth``): the text to publish, the phase
    output the model produced (its last attempt), and what the check found and did."""

    title: str
    description: str
    phase: Any  # models.listing.PhaseOutput
    report: dict[str, Any]


def write_checked_text(generator: Any, requests: Sequence[Any], facts: Sequence[dict[str, str]]) -> list[CheckedText]:
    """Title and description from the verified facts, checked: a text naming a value that is not a
    fact, a merchant-only fact the merchant did not state, or a link is written once more with
    those phrases banned from decoding; what still breaks the rules is cut out of the text, and a
    text left too short is rebuilt from the facts alone. The report says which of these happened."""
    from models.listing import TextRequest
    from models.truth import merchant_text, text_rules

    rules = [text_rules(r.schema, f, merchant_text(r.merchant_title, r.merchant_description, r.merchant_attributes))
             for r, f in zip(requests, facts, strict=True)]
    first = generator.write_text([TextRequest(r, f) for r, f in zip(requests, facts, strict=True)])
    found = [_violations(rule, p.output) for rule, p in zip(rules, first, strict=True)]
    retry = [n for n, v in enumerate(found) if v]
    phases = list(first)
    if retry:
        again = generator.write_text([TextRequest(requests[n], facts[n], avoid=tuple(sorted(
            {x.phrase.lower() for x in found[n]}))) for n in retry])
        for n, phase in zip(retry, again, strict=True):
            phases[n] = phase
    return [_settle_text(requests[n], facts[n], rules[n], phases[n], found[n], retried=n in retry)
            for n in range(len(requests))]


def _violations(rules: Any, output: dict[str, Any]) -> list[Any]:
    return [v for name in ("title", "description") for v in rules.violations(output.get(name, ""))]


def _settle_text(request: Any, facts: dict[str, str], rules: Any, phase: Any, first_found: list[Any], *,
                 retried: bool) -> CheckedText:
    from models.categories import part_schema
    from models.truth import fallback_text, scrub

    bounds = part_schema(request.schema, "text")["properties"]
    text: dict[str, str] = {}
    repaired: list[str] = []
    remaining: list[dict[str, str]] = []
    for name in ("title", "description"):
        value = phase.output.get(name, "")
        found = rules.violations(value)
        if found:
            remaining += [{"field": name, "kind": v.kind, "phrase": v.phrase} for v in found]
            value = scrub(value, found)
            repaired.append(name)
        text[name] = value
    if repaired and any(not bounds[k]["minLength"] <= len(text[k]) <= bounds[k]["maxLength"] or rules.violations(text[k])
                        for k in text):
        text = fallback_text(request.schema.name, facts, min_title=bounds["title"]["minLength"],
                             max_title=bounds["title"]["maxLength"],
                             min_description=bounds["description"]["minLength"],
                             max_description=bounds["description"]["maxLength"])
        repaired = ["title", "description"]
    report = {"retried": retried, "repaired": repaired,
              "found": [{"kind": v.kind, "phrase": v.phrase} for v in first_found], "remaining": remaining}
    return CheckedText(text["title"], text["description"], phase, report)


def run_model_batch(models: ModelBundle, items: list[ModelItem], *,
                    before: Callable[[list[ModelItem]], None] | None = None,
                    known: dict[tuple[int, str], Any] | None = None) -> list[ModelResult]:
    """One result per item, in order; never raises for a model failure (it becomes the item's error).

    An OOM halves the batch (``halve_on_oom``); any other failure of a batch is isolated to the
    item that caused it. ``before(items)`` runs at the start of every (sub-)batch: the pipeline's
    fault-injection point.
    """
    return halve_on_oom(lambda a, b: _run_isolating(models, items[a:b], before, known or {}), len(items),
                        on_oom=_free_accelerator_cache)


def _run_isolating(models: ModelBundle, items: list[ModelItem],
                   before: Callable[[list[ModelItem]], None] | None, known: dict[tuple[int, str], Any]) -> list[ModelResult]:
    try:
        return _run(models, items, before, known)
    except Exception as exc:
        if is_oom(exc):
            if len(items) > 1:
                raise  # halve_on_oom splits the batch
            _free_accelerator_cache()
            log.error("model.oom", job_id=items[0].job_id)
            return [ModelResult(job_id=items[0].job_id,
                                error=(OOM_CODE, "accelerator out of memory at batch size 1", True))]
        if len(items) > 1:
            log.warning("model.batch_failed_isolating", size=len(items), error=str(exc)[:200])
            return [r for item in items for r in _run_isolating(models, [item], before, known)]
        log.exception("model.item_failed", job_id=items[0].job_id)
        return [ModelResult(job_id=items[0].job_id,
                            error=(MODEL_ERROR_CODE, f"{type(exc).__name__}: {exc}"[:500], False))]


class BatcherUnavailable(Exception):
    """The micro-batcher gave this item no result: worth retrying (here later, or in a fresh process)."""


class BatchWaitTimeout(BatcherUnavailable, TimeoutError):
    """No result within the caller's timeout (the model thread is slow, stuck, or far behind)."""


class BatcherHung(BatcherUnavailable):
    """A batch ran longer than ``hang_after_s``: the model thread is presumed hung for good."""


class MicroBatcher(Generic[In, Out]):
    """One model thread running batches for many submitting threads.

    ``run(item, timeout)`` waits a bounded time: on expiry the item is withdrawn (if its batch has
    not started) and ``BatchWaitTimeout`` is raised. With ``hang_after_s``, a watchdog thread
    watches the running batch: one that runs longer is *hung*. A Python thread cannot be killed,
    and starting another model thread beside it would pile hung threads (and their accelerator
    memory) up in the process, so the batcher instead fails every waiting caller with
    ``BatcherHung``, refuses new items, and calls ``on_hang`` once: the worker ends the process
    there and its supervisor starts a fresh one (``workers.supervision``).
    """

    def __init__(self, run_batch: Callable[[list[In]], Sequence[Out]], *, max_size: int, max_wait_ms: int,
                 hang_after_s: float | None = None, on_hang: Callable[[], None] | None = None,
                 prepare: Callable[[], None] | None = None, load_factor: float = 10.0,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._run_batch = run_batch
        self._on_batch = on_batch  # (batch size, seconds spent filling it): the worker's metrics
        self._fill_wait_s = 0.0
        # ``prepare`` runs before each batch (loading the models the batch will use: slow once, then
        # a no-op). It is watched with a longer allowance (``load_factor`` x ``hang_after_s``), so a
        # first batch's model load is not mistaken for a hung batch, and a load that never ends is.
        self._prepare = prepare
        self._load_factor = max(1.0, load_factor)
        self._limit = hang_after_s
        self._max_size = max(1, max_size)
        self._max_wait = max(0, max_wait_ms) / 1000
        self._queue: queue.Queue[tuple[In, Future[Out]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._closed = False
        self._stopped = threading.Event()
        self._state = threading.Lock()
        self._running: list[Future[Out]] = []  # the futures of the batch in progress
        self._running_since: float | None = None
        self._hang_after = hang_after_s if hang_after_s and hang_after_s > 0 else None
        self._on_hang = on_hang
        self.hung = False
        self.batches_run = 0
        self.items_run = 0
        self._thread.start()
        if self._hang_after is not None:
            threading.Thread(target=self._watch, name="micro-batcher-watchdog", daemon=True).start()

    def submit(self, item: In) -> Future[Out]:
        if self.hung:
            raise BatcherHung("the model thread is hung; this process is restarting")
        if self._closed:
            raise RuntimeError("batcher closed")
        fut: Future[Out] = Future()
        self._queue.put((item, fut))
        if self.hung:  # declared while this was being queued, after the watchdog drained the queue
            _settle(fut, exc=BatcherHung("the model thread is hung; this process is restarting"))
        return fut

    def run(self, item: In, timeout: float | None = None) -> Out:
        """The item's result; ``BatchWaitTimeout`` when none came within ``timeout`` seconds."""
        fut = self.submit(item)
        done, _ = wait([fut], timeout=timeout)
        # cancel(): withdrawn from a batch that has not started; a running batch's result is dropped
        if not done and (fut.cancel() or not fut.done()):
            log.warning("batch.wait_timeout", timeout_s=timeout)
            raise BatchWaitTimeout(f"no model result within {timeout:g} s (model thread slow, stuck or behind)")
        return fut.result()

    def close(self) -> None:
        self._closed = True
        self._stopped.set()
        self._queue.put(None)

    def _collect(self) -> list[tuple[In, Future[Out]]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        opened = time.monotonic()
        deadline = opened + self._max_wait
        while len(batch) < self._max_size:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=max(0.0, remaining)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            batch.append(nxt)
        self._fill_wait_s = time.monotonic() - opened
        return batch

    def _loop(self) -> None:
        while not self.hung and (batch := self._collect()) is not None:
            # Callers that gave up (run's timeout) cancelled their futures: their items are dropped.
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            items = [item for item, _ in batch]
            if self._on_batch is not None:
                try:
                    self._on_batch(len(items), self._fill_wait_s)
                except Exception:  # noqa: BLE001 - an observer never fails a batch
                    log.warning("batch.observer_failed", exc_info=True)
            try:
                if self._prepare is not None:
                    with self._state:
                        self._running, self._running_since = [fut for _, fut in batch], time.monotonic()
                        self._limit = self._hang_after * self._load_factor if self._hang_after else None
                    self._prepare()
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                self._finish_batch()
                for _, fut in batch:
                    _settle(fut, exc=exc)
                continue
            started, started_cpu = time.perf_counter(), time.thread_time()
            with self._state:
                self._running, self._running_since = [fut for _, fut in batch], time.monotonic()
                self._limit = self._hang_after
            try:
                results = list(self._run_batch(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                self._finish_batch()
                for _, fut in batch:
                    _settle(fut, exc=exc)
                continue
            self._finish_batch()
            if self.hung:  # its callers were already failed; the process is on its way out
                log.warning("batch.done_after_hang", size=len(items),
                            took_ms=round((time.perf_counter() - started) * 1000, 1))
                break
            self.batches_run += 1
            self.items_run += len(items)
            # cpu_ms is this thread's own CPU time: well below took_ms, the thread waited for a core, the
            # GIL or the device (and the grammar fill threads are not counted).
            log.info("batch.done", size=len(items), took_ms=round((time.perf_counter() - started) * 1000, 1),
                     cpu_ms=round((time.thread_time() - started_cpu) * 1000, 1))
            for (_, fut), result in zip(batch, results, strict=True):
                _settle(fut, result=result)

    def _finish_batch(self) -> None:
        with self._state:
            self._running, self._running_since = [], None

    def _watch(self) -> None:
        assert self._hang_after is not None
        period = min(1.0, self._hang_after / 4)
        while not self._stopped.wait(period):
            with self._state:
                since, running, limit = self._running_since, list(self._running), self._limit
            if since is None or limit is None or time.monotonic() - since < limit:
                continue
            self._declare_hung(running, time.monotonic() - since, limit)
            return

    def _declare_hung(self, running: list[Future[Out]], took_s: float, limit: float) -> None:
        self.hung = True
        error = BatcherHung(f"a model batch has run {took_s:.0f} s (limit {limit:g} s): "
                            "the model thread is hung; this process is restarting")
        waiting: list[Future[Out]] = []
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                self._queue.put(None)
                break
            waiting.append(entry[1])
        log.critical("batch.hung", running_s=round(took_s, 1), hang_after_s=limit,
                     batch_size=len(running), waiting=len(waiting))
        for fut in [*running, *waiting]:
            _settle(fut, exc=error)
        if self._on_hang is not None:
            try:
                self._on_hang()
            except Exception:  # noqa: BLE001 - the watchdog must not die silently
                log.exception("batch.on_hang_failed")


def _settle(fut: Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete a future unless someone already did (the watchdog failed it, or it was cancelled)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
