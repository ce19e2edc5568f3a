"""Category listing schemas: one versioned JSON Schema file per category in ``models/schemas/``.

The JSON files are the source of truth (other languages and the marketplace backend read them too).
Each file is the *model output* schema — only attributes a model can check on the photo — plus an
``x-catalog`` block with the category's name, version, aliases and the merchant-only attributes
(material, size, brand, …) that are never generated and only ever come from the merchant.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from models.errors import UnsupportedCategory

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
GENERIC = "generic"
_FILE_RE = re.compile(r"^(?P<name>[a-z0-9-]+)\.v(?P<version>\d+)\.json$")


@dataclass(frozen=True)
class CategorySchema:
    """One category's listing contract, as the generator and the verifier see it."""

    name: str
    version: int
    schema_id: str  # "dress@1": what stored rows and DPO records carry
    json_schema: Mapping[str, Any] = field(repr=False)  # model output schema, x-catalog stripped
    visual_attributes: dict[str, list[str]] = field(repr=False)
    required_attributes: tuple[str, ...] = ()
    merchant_only_attributes: list[str] = field(default_factory=list)
    aliases: tuple[str, ...] = ()
    uri: str = ""  # the file's $id

    def __hash__(self) -> int:  # json_schema is a dict; identity is (name, version)
        return hash(self.schema_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategorySchema) and other.schema_id == self.schema_id


def _parse(raw: dict[str, Any]) -> CategorySchema:
    meta = raw["x-catalog"]
    output_schema = {k: v for k, v in copy.deepcopy(raw).items() if k != "x-catalog"}
    attrs = output_schema["properties"]["attributes"]
    visual = {name: list(prop["enum"]) for name, prop in attrs["properties"].items()}
    return CategorySchema(
        name=meta["category"],
        version=int(meta["version"]),
        schema_id=f"{meta['category']}@{meta['version']}",
        json_schema=output_schema,
        visual_attributes=visual,
        required_attributes=tuple(attrs.get("required", ())),
        merchant_only_attributes=list(meta.get("merchant_only_attributes", [])),
        aliases=tuple(meta.get("aliases", ())),
        uri=raw.get("$id", ""),
    )


@cache
def _available() -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for path in SCHEMA_DIR.glob("*.json"):
        m = _FILE_RE.match(path.name)
        if m:
            found.setdefault(m["name"], {})[int(m["version"])] = path
    return found


def load_schema(name: str, version: int | None = None) -> CategorySchema:
    """Load ``<name>.v<version>.json`` (the latest version when ``version`` is None); one object per file."""
    versions = _available().get(name)
    if not versions:
        raise UnsupportedCategory(f"no listing schema for category {name!r}", reason="unknown_category")
    chosen = max(versions) if version is None else version
    if chosen not in versions:
        raise UnsupportedCategory(f"no version {chosen} of the {name!r} schema", reason="unknown_version")
    return _load_file(name, chosen, versions[chosen])


@cache
def _load_file(name: str, version: int, path: Path) -> CategorySchema:
    schema = _parse(json.loads(path.read_text()))
    if schema.name != name or schema.version != version:
        raise ValueError(f"{path.name}: x-catalog says {schema.schema_id}")
    return schema


CATEGORIES: dict[str, CategorySchema] = {name: load_schema(name) for name in sorted(_available())}


def normalise_category(category: str) -> str:
    """Lower-case, trim, and fold spaces/underscores to single hyphens: ' T_Shirt ' -> 't-shirt'."""
    return re.sub(r"[\s_-]+", "-", category.strip().lower())


@cache
def _alias_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for name, schema in CATEGORIES.items():
        for key in (name, *schema.aliases):
            index[normalise_category(key)] = name
            index[normalise_category(key).replace("-", "")] = name
    return index


def resolve_schema(category: str, *, unknown: Literal["generic", "reject"] = "generic") -> CategorySchema:
    """Map a merchant's free-text category to a schema.

    Exact names and aliases first, then a trailing plural 's'; anything else gets the generic schema
    or, with ``unknown='reject'``, raises UnsupportedCategory (code ``unsupported_category``).
    """
    if unknown not in ("generic", "reject"):
        raise ValueError(f"unknown must be 'generic' or 'reject', not {unknown!r}")
    key = normalise_category(category or "")
    index = _alias_index()
    plural_or_singular = key[:-1] if key.endswith("s") else f"{key}s"
    for candidate in (key, key.replace("-", ""), plural_or_singular):
        if candidate and candidate in index:
            return CATEGORIES[index[candidate]]
    if unknown == "reject":
        raise UnsupportedCategory(f"category {category!r} has no listing schema", reason="unknown_category")
    return CATEGORIES[GENERIC]


ListingPart = Literal["listing", "attributes", "text"]


@cache
def part_schema(schema: CategorySchema, part: ListingPart) -> Mapping[str, Any]:
    """The JSON Schema of one generation phase: the whole ``listing``, its ``attributes`` object
    (phase one), or the ``text`` object of title and description (phase two). Both parts are
    objects of the listing's own properties, so each phase's output is a piece of a valid listing."""
    props = schema.json_schema["properties"]
    if part == "listing":
        return schema.json_schema
    if part == "attributes":
        return props["attributes"]
    if part == "text":
        return {"type": "object", "properties": {"title": props["title"], "description": props["description"]},
                "required": ["title", "description"], "additionalProperties": False}
    raise ValueError(f"unknown listing part {part!r}")


@cache
def _validator(schema: CategorySchema) -> Draft202012Validator:
    return Draft202012Validator(dict(schema.json_schema))


def validate_listing(schema: CategorySchema, obj: Any) -> None:
    """Raise ``jsonschema.ValidationError`` (the most relevant one) when ``obj`` breaks the schema."""
    error = best_match(_validator(schema).iter_errors(obj))
    if error is not None:
        raise error
