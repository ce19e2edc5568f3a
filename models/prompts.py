"""Natural-language names for catalog categories, shared by every text prompt the models see.

Dataset and marketplace category keys ("outwear", "longsleeve") are not words a detector or CLIP
was trained on; prompts read better, and score better with pretrained weights, with plain nouns.
"""

from __future__ import annotations

_CATEGORY_NOUNS: dict[str, str] = {
    "t-shirt": "t-shirt",
    "tshirt": "t-shirt",
    "longsleeve": "long-sleeved shirt",
    "outwear": "jacket",
    "outerwear": "jacket",
    "pants": "pair of pants",
    "shorts": "pair of shorts",
    "shoes": "pair of shoes",
    "hat": "hat",
    "dress": "dress",
    "shirt": "shirt",
    "skirt": "skirt",
    "generic": "clothing item",
}


def category_noun(category: str) -> str:
    """The noun phrase for a category key; unknown keys fall back to the key with separators spaced."""
    key = category.strip().lower()
    return _CATEGORY_NOUNS.get(key) or key.replace("_", " ").replace("-", " ") or "product"


def detection_prompt(category: str) -> str:
    """The zero-shot detector query for a product of this category."""
    return f"a photo of a {category_noun(category)}"
