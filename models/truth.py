"""What a listing's title and description may say: the facts the listing rests on, and a check.

Attributes are generated and verified before the text (``models.listing``: two phases), so the
text can be checked against what survived verification. A listing's *facts* are its kept visual
attributes (verified against the image, or given by the merchant) and what the merchant wrote.
The check finds, in a generated title or description:

* ``contradiction``: a value of one of the schema's visual attributes that is not a fact, e.g.
  "red" when ``color: red`` was dropped or ``color: blue`` was kept. Each value has surface forms
  (``value_phrases``): distinctive values stand alone ("striped", "polka dot", "turtleneck");
  values that are ordinary words ("short", "high", "round", "regular") only count together with
  their attribute's noun ("short sleeves", "high waist", "round toe", "regular fit"), so "long
  lasting" never trips the check while "long-sleeved" does.
* ``merchant_only``: material, size and care words (``MERCHANT_ONLY_VOCABULARY``) the merchant did
  not write anywhere in the product's text or attributes. Brands have no closed vocabulary and are
  not detected here; the prompt tells the model never to name one.
* ``contact``: links, e-mail addresses and @handles, which a listing never carries (merchant text
  is untrusted and may ask for them).

A banned phrase inside an allowed one does not count ("polka dot" kept: its "dot" is not a
claim of its own); one that merely overlaps does ("sun hat" is a claim although "hat" is the noun). Everything here is pure string work, no model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Protocol

from models.prompts import category_noun

ViolationKind = Literal["contradiction", "merchant_only", "contact"]

# Values that are ordinary English words: they name an attribute only beside its noun.
_ORDINARY = frozenset({
    "athletic", "board", "button", "buttons", "cap", "cropped", "fitted", "flat", "full", "high", "hip", "knee",
    "long", "loose", "low", "medium", "mid", "open", "regular", "relaxed", "round", "short", "slim", "square",
    "straight", "thigh", "wide", "wrap", "ankle", "lug", "camp", "spread", "pencil", "tiered", "pleated",
})
# Values that name nothing a text could state ("none", "other").
_UNNAMEABLE = frozenset({"none", "other", "no_hood"})
# The nouns an attribute's ordinary values go with.
_NOUNS: dict[str, tuple[str, ...]] = {
    "sleeve_length": ("sleeve",), "length": ("length", "hem"), "brim": ("brim",), "waist": ("waist", "waistband"),
    "rise": ("rise",), "heel_height": ("heel",), "sole": ("sole",), "toe": ("toe",), "neckline": ("neck", "neckline"),
    "fit": ("fit",), "collar": ("collar",), "closure": ("closure", "fastening"), "silhouette": ("silhouette", "cut"),
    "pants_type": ("pants", "trousers"), "shorts_type": ("shorts",), "hat_type": ("hat",),
}
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "multicolor": ("multicolor", "multicolour", "multi color", "multi colour", "multicolored", "multicoloured"),
    "gray": ("gray", "grey"),
    "checked": ("checked", "plaid", "check pattern"),
    "sleeveless": ("sleeveless",),
    "three_quarter": ("three quarter sleeve", "3/4 sleeve"),
    "hooded": ("hooded", "hoodie"),
}

MERCHANT_ONLY_VOCABULARY: dict[str, tuple[str, ...]] = {
    "material": ("cotton", "polyester", "wool", "merino", "cashmere", "silk", "satin", "linen", "leather",
                 "suede", "nylon", "spandex", "elastane", "lycra", "viscose", "rayon", "modal", "acrylic",
                 "fleece", "velvet", "corduroy", "organic", "bamboo", "hemp", "down filled", "faux fur", "fur",
                 "gore-tex", "waterproof", "water resistant"),
    "size": ("xxs", "xs", "xl", "xxl", "xxxl", "petite", "plus size", "one size", "size"),
    "care_instructions": ("machine wash", "hand wash", "dry clean", "tumble dry", "iron", "bleach"),
}
_CONTACT = re.compile(r"(?i)\bhttps?://\S*[^\s.,;:!?)]|\bwww\.\S*[^\s.,;:!?)]|\b[\w.+-]+@[\w-]+\.[\w.]+|(?<!\w)@\w{2,}"
                      r"|\b[\w-]+\.(?:com|net|org|io|shop|store|co|biz|info)\b")


def _pattern(phrase: str) -> str:
    """A phrase as a regex: words joined by spaces, hyphens or underscores, the last one optionally
    inflected (sleeve -> sleeves, sleeved), case-insensitive, on word boundaries."""
    words = [re.escape(w) for w in re.split(r"[\s_-]+", phrase.strip()) if w]
    return r"(?<![\w])" + r"[\s_-]*".join(words) + r"(?:s|es|d|ed)?(?![\w])"


def value_phrases(attribute: str, value: str) -> tuple[str, ...]:
    """The surface forms by which a text names ``attribute = value`` (empty when it cannot)."""
    if value in _UNNAMEABLE:
        return ()
    if value in _SYNONYMS:
        return _SYNONYMS[value]
    words = value.replace("_", " ")
    if value in _ORDINARY:
        return tuple(f"{words} {noun}" for noun in _NOUNS.get(attribute, (attribute.replace("_", " "),)))
    return (words,)


@cache
def _regex(phrases: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(_pattern(p) for p in phrases), re.IGNORECASE) if phrases else None


class _Schema(Protocol):
    name: str
    visual_attributes: dict[str, list[str]]
    merchant_only_attributes: list[str]


@dataclass(frozen=True)
class Violation:
    kind: ViolationKind
    phrase: str  # the text as it appears
    start: int
    end: int
    attribute: str | None = None


@dataclass(frozen=True)
class TextRules:
    """The phrases a listing's text may and may not contain."""

    allowed: tuple[str, ...]
    banned: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # kind -> ((attribute, phrase), …)

    def violations(self, text: str) -> list[Violation]:
        """Banned phrases in ``text`` that no allowed phrase covers, in text order."""
        allowed_spans = [m.span() for m in _regex(self.allowed).finditer(text)] if self.allowed else []
        found: list[Violation] = []
        for kind, entries in self.banned.items():
            for attribute, phrase in entries:
                for m in _regex((phrase,)).finditer(text):  # type: ignore[union-attr]
                    if not any(a <= m.start() and m.end() <= b for a, b in allowed_spans):
                        found.append(Violation(kind, m.group(0), m.start(), m.end(), attribute))  # type: ignore[arg-type]
        for m in _CONTACT.finditer(text):
            found.append(Violation("contact", m.group(0), m.start(), m.end()))
        return sorted(found, key=lambda v: (v.start, -v.end))

    def banned_phrases(self) -> list[str]:
        return sorted({phrase for entries in self.banned.values() for _, phrase in entries})


def merchant_text(title: str, description: str, attributes: Mapping[str, Any] | None) -> str:
    """Everything the merchant wrote about the product, as one string to look phrases up in."""
    parts = [title or "", description or ""]
    parts += [f"{k} {v}" for k, v in (attributes or {}).items() if v is not None]
    return "\n".join(str(p) for p in parts)


def _stated(phrase: str, text: str) -> bool:
    return bool(_regex((phrase,)).search(text))  # type: ignore[union-attr]


def text_rules(schema: _Schema, facts: Mapping[str, str], merchant: str) -> TextRules:
    """``facts``: the listing's kept visual attributes (name -> value, image-verified or the
    merchant's); ``merchant``: ``merchant_text(...)``. Phrases the merchant wrote are allowed."""
    # The category's own noun ("jacket" for outerwear) is what the listing is about, never a claim.
    allowed = {category_noun(schema.name), *(p for name, value in facts.items() for p in value_phrases(name, str(value)))}
    contradictions: list[tuple[str, str]] = []
    for name, values in schema.visual_attributes.items():
        for value in values:
            if facts.get(name) == value:
                continue
            for phrase in value_phrases(name, value):
                if phrase in allowed or _stated(phrase, merchant):
                    allowed.add(phrase)
                else:
                    contradictions.append((name, phrase))
    merchant_only: list[tuple[str, str]] = []
    for name in schema.merchant_only_attributes:
        for phrase in MERCHANT_ONLY_VOCABULARY.get(name, ()):
            if _stated(phrase, merchant):
                allowed.add(phrase)
            else:
                merchant_only.append((name, phrase))
    return TextRules(tuple(sorted(allowed)), {"contradiction": tuple(contradictions),
                                              "merchant_only": tuple(merchant_only)})


def scrub(text: str, violations: Iterable[Violation]) -> str:
    """``text`` with every violating span removed and the spacing and punctuation left tidy."""
    out, last = [], 0
    for v in sorted(violations, key=lambda v: v.start):
        if v.start < last:
            continue
        out.append(text[last:v.start])
        last = v.end
    out.append(text[last:])
    cleaned = "".join(out)
    cleaned = re.sub(r"(^|\s)[,;:](?=\s|$)", r"\1", cleaned)  # a separator left without its word
    cleaned = re.sub(r"\s{2,}", " ", cleaned)
    cleaned = re.sub(r"\s+([,.;:!?])", r"\1", cleaned)
    cleaned = re.sub(r"([,;:])\s*(?=[,.;:!?])", "", cleaned)
    return cleaned.strip(" ,;:-")


def fact_phrase(category: str, facts: Mapping[str, str]) -> str:
    """A plain noun phrase from the facts, for text that must be rebuilt: "striped blue shirt"."""
    words = [str(facts[k]).replace("_", " ") for k in ("pattern", "color") if facts.get(k) not in (None, *_UNNAMEABLE)]
    return " ".join([*words, category_noun(category)])


def fallback_text(category: str, facts: Mapping[str, str], *, min_title: int, max_title: int,
                  min_description: int, max_description: int) -> dict[str, str]:
    """Title and description built from the facts alone, within the schema's length bounds: the last
    resort when a generated text still breaks the rules after the constrained retry."""
    phrase = fact_phrase(category, facts)
    title = phrase[:1].upper() + phrase[1:]
    if len(title) < min_title:
        title = f"{title}, as pictured"
    details = [f"{str(v).replace('_', ' ')} {k.replace('_', ' ')}" for k, v in sorted(facts.items())
               if k not in ("pattern", "color") and v not in _UNNAMEABLE]
    description = f"A {phrase}" + (f" with {', '.join(details)}" if details else "") + ". Details as shown in the photos."
    return {"title": title.ljust(min_title, ".")[:max_title],
            "description": description.ljust(min_description, ".")[:max_description]}
