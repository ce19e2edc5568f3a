"""Held-out retrieval metrics of an embedder, from vectors (numpy only, no model, no database).

Definitions (the README states the same):

- **image→image HITS@k**: each held-out image queries the *other* held-out images by cosine; a hit
  when at least one of the top k shares its category. **MRR**: mean of 1/rank of the first
  same-category neighbour. Images that are the only one of their category are not queries.
- **text→image recall@k**: each query text ("a photo of a {category}", or an attribute query
  "a photo of a {value} {category}") retrieves the top k images; recall@k is the share of queries with
  at least one relevant image in those k (the usual CLIP retrieval recall), precision@k the share of
  relevant images among them.
- **zero-shot accuracy**: an image's predicted category is the prompt with the highest cosine.
- **attribute HITS@5**: like image HITS@5, but a neighbour counts only when it has the same category
  *and* the same value of the attribute; averaged over (image, attribute) pairs.

``category_checks`` is the category-mismatch signal: the zero-shot category disagrees with the
stated one with high probability (never for random weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CATEGORY_PROMPT = "a photo of a {category}"


def _ranked(similarity: np.ndarray) -> np.ndarray:
    return np.argsort(-similarity, axis=1, kind="stable")


def image_to_image(vectors: np.ndarray, labels: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """HITS@k and MRR of same-label retrieval, each item against all others. Only items with at
    least one other item of their label are queries (``queries``); none: the figures are None."""
    n = len(labels)
    labels_arr = np.asarray(labels)
    counts = {label: int(np.sum(labels_arr == label)) for label in set(labels)}
    queries = np.array([counts[label] > 1 for label in labels], dtype=bool)
    if n < 2 or not queries.any():
        return {**{f"hits@{k}": None for k in ks}, "mrr": None, "queries": 0}  # type: ignore[dict-item]
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -np.inf)
    order = _ranked(sim)[queries, : n - 1]
    relevant = labels_arr[order] == labels_arr[queries][:, None]
    out: dict[str, Any] = {f"hits@{k}": float(relevant[:, :k].any(axis=1).mean()) for k in ks}
    out["mrr"] = float(np.mean(1.0 / (relevant.argmax(axis=1) + 1)))
    out["queries"] = int(queries.sum())
    return out


def text_to_image(query_vectors: np.ndarray, relevant: np.ndarray, image_vectors: np.ndarray,
                  ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@k and precision@k; ``relevant`` is (queries, images) bool."""
    if query_vectors.shape[0] == 0:
        return {}
    order = _ranked(query_vectors @ image_vectors.T)
    hits = np.take_along_axis(relevant, order, axis=1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(hits[:, :k].any(axis=1).mean())
        out[f"precision@{k}"] = float(hits[:, :k].mean())
    return out


def zero_shot_accuracy(image_vectors: np.ndarray, labels: Sequence[str], class_vectors: np.ndarray,
                       class_names: Sequence[str]) -> float:
    predicted = np.asarray(class_names)[np.argmax(image_vectors @ class_vectors.T, axis=1)]
    return float(np.mean(predicted == np.asarray(labels)))


def zero_shot_predictions(image_vectors: np.ndarray, class_vectors: np.ndarray,
                          class_names: Sequence[str], temperature: float = 100.0) -> list[tuple[str, float]]:
    """(category, softmax probability) per image over the class prompts."""
    logits = temperature * image_vectors @ class_vectors.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    return [(class_names[int(b)], float(probs[i, b])) for i, b in enumerate(best)]


def attribute_hits(vectors: np.ndarray, categories: Sequence[str], attributes: Sequence[dict[str, Any]],
                   k: int = 5) -> float | None:
    n = len(categories)
    if n < 2:
        return None
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -np.inf)
    top = _ranked(sim)[:, :k]
    hits = total = 0
    for i in range(n):
        for name, value in (attributes[i] or {}).items():
            total += 1
            hits += any(categories[j] == categories[i] and (attributes[j] or {}).get(name) == value for j in top[i])
    return hits / total if total else None


def _attribute_queries(categories: Sequence[str], attributes: Sequence[dict[str, Any]],
                       noun: Callable[[str], str]) -> tuple[list[str], np.ndarray]:
    keys = sorted({(c, name, str(v)) for c, attrs in zip(categories, attributes, strict=True)
                   for name, v in (attrs or {}).items()})
    texts = [f"a photo of a {v.replace('_', ' ')} {noun(c)}" for c, _, v in keys]
    relevant = np.array([[c == ci and str((ai or {}).get(name)) == v for ci, ai in zip(categories, attributes,
                                                                                      strict=True)]
                         for c, name, v in keys], dtype=bool).reshape(len(keys), len(categories))
    return texts, relevant


def evaluate(image_vectors: np.ndarray, categories: Sequence[str], encode_texts: Callable[[list[str]], np.ndarray],
             *, attributes: Sequence[dict[str, Any]] | None = None, noun: Callable[[str], str] = lambda c: c,
             ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Every metric above for held-out images with their categories (and attributes, when known)."""
    categories = list(categories)
    classes = sorted(set(categories))
    out: dict[str, Any] = {"images": len(categories), "categories": len(classes)}
    if not categories:
        return out
    prompts = [CATEGORY_PROMPT.format(category=noun(c)) for c in classes]
    class_vectors = encode_texts(prompts)
    out["image_to_image"] = image_to_image(image_vectors, categories)
    relevant = np.asarray(categories)[None, :] == np.asarray(classes)[:, None]
    out["text_to_image"] = text_to_image(class_vectors, relevant, image_vectors, ks)
    out["zero_shot_accuracy"] = zero_shot_accuracy(image_vectors, categories, class_vectors, classes)
    if attributes is not None and any(attributes):
        texts, rel = _attribute_queries(categories, attributes, noun)
        out["attribute_text_to_image"] = {"queries": len(texts), **text_to_image(encode_texts(texts), rel,
                                                                                   image_vectors, ks)}
        out["attribute_hits@5"] = attribute_hits(image_vectors, categories, attributes, 5)
    return out


def headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The flat figures a registry row and a table show."""
    i2i, t2i = metrics.get("image_to_image") or {}, metrics.get("text_to_image") or {}
    return {"hits@1": i2i.get("hits@1"), "hits@5": i2i.get("hits@5"), "mrr": i2i.get("mrr"),
            "text_recall@1": t2i.get("recall@1"), "text_recall@5": t2i.get("recall@5"),
            "text_precision@10": t2i.get("precision@10"),
            "zero_shot_accuracy": metrics.get("zero_shot_accuracy"),
            "attribute_hits@5": metrics.get("attribute_hits@5")}


# --- the category-mismatch signal ------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryCheck:
    """What the embedder's zero-shot classifier says about a photo's stated category."""

    stated: str
    predicted: str
    confidence: float  # softmax probability of ``predicted`` over the category prompts
    stated_probability: float
    mismatch: bool


def category_checks(image_vectors: np.ndarray, stated: Sequence[str], class_vectors: np.ndarray,
                    class_names: Sequence[str], *, temperature: float, threshold: float = 0.8,
                    random_weights: bool = False) -> list[CategoryCheck]:
    """A mismatch when the zero-shot category differs from the stated one with probability at least
    ``threshold``. An embedder with random weights never raises one (its scores mean nothing)."""
    logits = temperature * image_vectors @ class_vectors.T
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    index = {c: i for i, c in enumerate(class_names)}
    out = []
    for row, category in zip(probs, stated, strict=True):
        best = int(row.argmax())
        stated_p = float(row[index[category]]) if category in index else 0.0
        predicted = class_names[best]
        out.append(CategoryCheck(category, predicted, float(row[best]), stated_p,
                                 mismatch=(not random_weights and predicted != category
                                           and float(row[best]) >= threshold)))
    return out
