"""Visual verification of generated attributes against the image (the MACE idea from the OPAL paper).

A VLM constrained to a schema always produces *some* enum value, confident or not. Each visual
attribute it generated is re-scored with CLIP zero-shot prompts over every allowed value of that
attribute; it is kept only when the generated value's probability beats the best alternative by
``margin``. Attributes a photo cannot show (material, size, brand, … the schema's
``merchant_only_attributes``) are never taken from the model; they come from the merchant or not at
all. Every kept attribute carries ``confidence`` and ``source``; every dropped one says why and which
value CLIP preferred, so reviewers and the preference-pair builder can see the disagreement.

The merchant's values of visual attributes are scored too, but never replaced: where the image
contradicts one with high confidence (``conflict_margin``) the listing reports a conflict for the
merchant to review, and only merchant values that pass the same margin test as generated ones
(``embedding_facts``) enter the visual-only text embedding; free-text merchant values never do.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from models.embeddings import ClipEmbedder
from models.prompts import category_noun

# What a product's extra photos often show instead of the product (size charts, care labels, …).
OFF_PRODUCT_PROMPTS = ("a size chart table", "a clothing care label with printed text", "a page of printed text",
                       "a barcode")
SOURCE_IMAGE = "image"
SOURCE_MERCHANT = "merchant"
# A product's category is called into question when another category wins the embedder's zero-shot
# vote with at least this probability (measured in README, "Category mismatch").
CATEGORY_MISMATCH_PROBABILITY = 0.8


class _Schema(Protocol):
    name: str
    visual_attributes: dict[str, list[str]]
    merchant_only_attributes: list[str]


@dataclass(frozen=True)
class VerifiedListing:
    """``content``: title, description and kept attributes ({name: {value, confidence, source}}).
    ``dropped``: generated attributes not kept ({name: {value, reason, clip_value, confidence}}).
    ``conflicts``: merchant values the image contradicts with high confidence ([{attribute,
    merchant_value, image_value, confidence}]); the merchant's value stays, for them to review.
    ``embedding_facts``: the visual values the text embedding may use: the image-verified ones and
    the merchant's that passed the same margin test (never free text, never a contradicted one)."""

    content: dict[str, Any]
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    embedding_facts: dict[str, str] = field(default_factory=dict)

    def facts(self, schema: _Schema) -> dict[str, str]:
        """The kept visual values the listing's text is written from (the merchant's included)."""
        return {name: str(a["value"]) for name, a in self.content.get("attributes", {}).items()
                if name in schema.visual_attributes}


def _words(value: str) -> str:
    return value.replace("_", " ").strip()


def attribute_prompt(category: str, attribute: str, value: str) -> str:
    """The CLIP zero-shot prompt for "this product has attribute=value", phrased as a caption."""
    noun = category_noun(category)
    words = _words(value)
    if attribute in {"color", "fit", "length", "silhouette"}:
        return f"a photo of a {words} {noun}"
    if attribute == "pattern":
        return f"a photo of a {'plain' if value == 'solid' else words} patterned {noun}"
    if attribute.endswith("_type"):
        return f"a photo of {words}, a kind of {noun}"
    if attribute == "sleeve_length":
        return f"a photo of a sleeveless {noun}" if value == "sleeveless" else f"a photo of a {noun} with {words} sleeves"
    if value in {"none", "no_hood"}:
        return f"a photo of a {noun} without a {_words(attribute).removesuffix(' type')}"
    if value == "hooded":
        return f"a photo of a hooded {noun}"
    return f"a photo of a {noun} with a {words} {_words(attribute)}"


class AttributeVerifier:
    """Scores generated visual attributes with CLIP; keeps those with a clear margin."""

    def __init__(self, embedder: ClipEmbedder, margin: float, conflict_margin: float = 0.5) -> None:
        if not 0.0 <= margin <= 1.0 or not 0.0 <= conflict_margin <= 1.0:
            raise ValueError(f"margins must be within [0, 1], got {margin} and {conflict_margin}")
        self.embedder = embedder
        self.margin = margin
        self.conflict_margin = conflict_margin
        # Prompt embeddings depend only on (category, attribute, allowed values), never on the image.
        self._prompt_cache: dict[tuple[str, str, tuple[str, ...]], np.ndarray] = {}
        self._cache_lock = threading.Lock()

    def verify(
        self,
        crops: Sequence[Image.Image],
        generated: Sequence[Mapping[str, Any]],
        schemas: Sequence[_Schema],
        merchant_attributes: Sequence[Mapping[str, Any] | None],
        forced: Sequence[Collection[str]] | None = None,
        image_vectors: Sequence[np.ndarray] | None = None,
    ) -> list[VerifiedListing]:
        """One ``VerifiedListing`` per product; inputs are parallel lists (one entry per product).

        ``forced``: per product, the generated attributes that were completed past the token
        budget (``models.listing``): dropped with reason ``forced``, never kept as facts.
        ``image_vectors``: each product's CLIP image vector when the caller has it already (the
        pipeline embeds every crop once and passes the product vector: the mean of the crops that
        show the product, i.e. a soft vote of its photos); otherwise ``crops`` are embedded here."""
        n = len(crops)
        forced = forced if forced is not None else [()] * n
        if not (len(generated) == len(schemas) == len(merchant_attributes) == len(forced) == n):
            raise ValueError("crops, generated, schemas, merchant_attributes and forced must have the same length")
        pending = [self._to_score(g, s, m or {}, set(f))
                   for g, s, m, f in zip(generated, schemas, merchant_attributes, forced)]
        needs_image = [i for i in range(n) if pending[i]]
        if image_vectors is not None:
            vectors = {i: np.asarray(image_vectors[i], dtype=np.float32) for i in needs_image}
        else:
            vectors = dict(zip(needs_image, self.embedder.embed_images([crops[i] for i in needs_image])))
        self._warm_prompt_cache([(schemas[i], name) for i in needs_image for name in pending[i]])
        scale = self.embedder.logit_scale if needs_image else 1.0
        return [
            self._listing(generated[i], schemas[i], merchant_attributes[i] or {}, pending[i], set(forced[i]),
                          vectors.get(i), scale)
            for i in range(n)
        ]

    def shows_product(self, image_vectors: np.ndarray, categories: Sequence[str]) -> list[tuple[bool, float]]:
        """Whether each photo shows the product (and the probability): CLIP zero-shot between "a photo
        of a <category>" and pictures a product listing also carries that are not the product
        (``OFF_PRODUCT_PROMPTS``: a size chart, a care label, printed text, a barcode). A photo is
        off-product when one of those beats the category; it then neither votes on attributes nor
        enters the product vector (it keeps its own image embedding)."""
        if len(image_vectors) == 0:
            return []
        prompts = sorted({f"a photo of a {category_noun(c)}" for c in categories})
        key = ("_shows_product", "", tuple(prompts) + OFF_PRODUCT_PROMPTS)
        with self._cache_lock:
            cached = self._prompt_cache.get(key)
        if cached is None:
            cached = self.embedder.embed_texts([*prompts, *OFF_PRODUCT_PROMPTS])
            with self._cache_lock:
                self._prompt_cache[key] = cached
        index = {p: i for i, p in enumerate(prompts)}
        off = cached[len(prompts):]
        out = []
        for vector, category in zip(image_vectors, categories, strict=True):
            rows = np.vstack([cached[index[f"a photo of a {category_noun(category)}"]][None, :], off])
            probs = _softmax(self.embedder.logit_scale * (rows @ vector))
            out.append((bool(probs.argmax() == 0), round(float(probs[0]), 4)))
        return out

    def category_checks(self, image_vectors: np.ndarray, categories: Sequence[str | None], *,
                        threshold: float = CATEGORY_MISMATCH_PROBABILITY) -> list[dict[str, Any] | None]:
        """The embedder's zero-shot category of each product vector against the merchant's: a softmax
        over "a photo of a <category>" for every category with a schema, at the model's own
        temperature (``models.retrieval_eval.category_checks``). ``mismatch`` when another category
        wins with probability >= ``threshold``; never for random weights (their vote means nothing).
        ``None`` for a product without a known category (the generic schema)."""
        from models.categories import CATEGORIES
        from models.retrieval_eval import category_checks

        names = sorted(c for c in CATEGORIES if c != "generic")
        wanted = [k for k, c in enumerate(categories) if c in names]
        out: list[dict[str, Any] | None] = [None] * len(categories)
        if not wanted or len(image_vectors) == 0:
            return out
        key = ("_category_checks", "", tuple(names))
        with self._cache_lock:
            classes = self._prompt_cache.get(key)
        if classes is None:
            classes = self.embedder.embed_texts([f"a photo of a {category_noun(c)}" for c in names])
            with self._cache_lock:
                self._prompt_cache[key] = classes
        checks = category_checks(np.asarray([image_vectors[k] for k in wanted]), [categories[k] for k in wanted],
                                 classes, names, temperature=self.embedder.logit_scale, threshold=threshold,
                                 random_weights=self.embedder.version().random_weights)
        for k, check in zip(wanted, checks, strict=True):
            out[k] = {"stated": check.stated, "predicted": check.predicted,
                      "probability": round(check.confidence, 4),
                      "stated_probability": round(check.stated_probability, 4), "mismatch": check.mismatch}
        return out

    # --- steps ---------------------------------------------------------------------------------------

    @staticmethod
    def _to_score(generated: Mapping[str, Any], schema: _Schema, merchant: Mapping[str, Any],
                  forced: set[str]) -> dict[str, str]:
        """Visual values CLIP scores: generated ones the merchant did not give (unless forced), and
        the merchant's own values of visual attributes (for conflicts and the embedding facts)."""
        out: dict[str, str] = {}
        for name, value in (generated.get("attributes") or {}).items():
            allowed = schema.visual_attributes.get(name)
            if (allowed and isinstance(value, str) and value in allowed and not _given(merchant, name)
                    and name not in forced):
                out[name] = value
        for name, allowed in schema.visual_attributes.items():
            value = merchant.get(name)
            if isinstance(value, str) and value in allowed:
                out[name] = value
        return out

    def _warm_prompt_cache(self, needed: list[tuple[_Schema, str]]) -> None:
        missing: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
        for schema, name in needed:
            values = tuple(schema.visual_attributes[name])
            key = (schema.name, name, values)
            if key not in self._prompt_cache and key not in missing:
                missing[key] = [attribute_prompt(schema.name, name, v) for v in values]
        if not missing:
            return
        vectors = self.embedder.embed_texts([p for prompts in missing.values() for p in prompts])
        with self._cache_lock:
            start = 0
            for key, prompts in missing.items():
                self._prompt_cache[key] = vectors[start : start + len(prompts)]
                start += len(prompts)

    def _listing(
        self,
        generated: Mapping[str, Any],
        schema: _Schema,
        merchant: Mapping[str, Any],
        to_score: dict[str, str],
        forced: set[str],
        image_vector: np.ndarray | None,
        logit_scale: float,
    ) -> VerifiedListing:
        attributes: dict[str, dict[str, Any]] = {}
        dropped: dict[str, dict[str, Any]] = {}
        conflicts: list[dict[str, Any]] = []
        embedding_facts: dict[str, str] = {}
        for name, value in (generated.get("attributes") or {}).items():
            if name in to_score or _given(merchant, name):
                continue
            if name in forced:
                reason = "forced"
            else:
                reason = "merchant_only" if name in schema.merchant_only_attributes else "not_in_schema"
            dropped[name] = {"value": value, "reason": reason, "clip_value": None, "confidence": None}
        for name, value in to_score.items():
            values = schema.visual_attributes[name]
            probs = _softmax(logit_scale * (self._prompt_cache[(schema.name, name, tuple(values))] @ image_vector))
            chosen = values.index(value)
            rival = float(np.delete(probs, chosen).max()) if len(values) > 1 else 0.0
            confidence = round(float(probs[chosen]), 4)
            best = int(probs.argmax())
            passed = probs[chosen] - rival >= self.margin
            if passed:
                embedding_facts[name] = value
            if _given(merchant, name):  # the merchant's value: kept as theirs; contradicted -> reported
                if best != chosen and probs[best] - probs[chosen] >= self.conflict_margin:
                    conflicts.append({"attribute": name, "merchant_value": value, "image_value": values[best],
                                      "confidence": round(float(probs[best]), 4)})
                    embedding_facts.pop(name, None)
            elif passed:
                attributes[name] = {"value": value, "confidence": confidence, "source": SOURCE_IMAGE}
            else:
                reason = "clip_prefers_other" if best != chosen else "below_margin"
                dropped[name] = {"value": value, "reason": reason, "clip_value": values[best], "confidence": confidence}
        for name in [*schema.visual_attributes, *schema.merchant_only_attributes]:
            if _given(merchant, name):
                attributes[name] = {"value": merchant[name], "confidence": 1.0, "source": SOURCE_MERCHANT}
        content = {"title": generated.get("title", ""), "description": generated.get("description", ""),
                   "attributes": attributes}
        return VerifiedListing(content=content, dropped=dropped, conflicts=conflicts, embedding_facts=embedding_facts)


def _given(merchant: Mapping[str, Any], name: str) -> bool:
    value = merchant.get(name)
    return value is not None and value != ""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
