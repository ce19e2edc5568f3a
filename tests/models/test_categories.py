"""Category schemas: valid JSON Schema files, enumerated visual attributes, category resolution."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

from models.categories import CATEGORIES, SCHEMA_DIR, load_schema, resolve_schema, validate_listing
from models.errors import UnsupportedCategory

DATASET_CATEGORIES = {"dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt", "t-shirt"}
NON_VISUAL = {"material", "size", "brand", "care_instructions"}


def _objects(node: Any):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def _valid_listing(name: str) -> dict[str, Any]:
    schema = CATEGORIES[name]
    return {
        "title": "A plain blue item for sale",
        "description": "Photographed on a white background, front view.",
        "attributes": {attr: schema.visual_attributes[attr][0] for attr in schema.required_attributes},
    }


def test_one_schema_file_per_dataset_category_plus_generic(manifest: list[dict[str, str]]) -> None:
    assert {row["category"] for row in manifest} == DATASET_CATEGORIES
    assert set(CATEGORIES) == DATASET_CATEGORIES | {"generic"}
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(f"{n}.v1.json" for n in CATEGORIES)


@pytest.mark.parametrize("name", sorted(DATASET_CATEGORIES | {"generic"}))
def test_schema_file_is_valid_versioned_2020_12_schema(name: str) -> None:
    raw = json.loads((SCHEMA_DIR / f"{name}.v1.json").read_text())
    Draft202012Validator.check_schema(raw)
    assert raw["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert raw["$id"].endswith(f"/{name}/v1.json")
    schema = CATEGORIES[name]
    assert (schema.name, schema.version, schema.schema_id) == (name, 1, f"{name}@1")
    assert "x-catalog" not in schema.json_schema  # metadata is not part of the model output schema
    Draft202012Validator.check_schema(dict(schema.json_schema))


@pytest.mark.parametrize("name", sorted(CATEGORIES))
def test_schema_shape_bounds_and_closed_objects(name: str) -> None:
    schema = CATEGORIES[name]
    js = schema.json_schema
    assert js["required"] == ["title", "description", "attributes"]
    title, description = js["properties"]["title"], js["properties"]["description"]
    assert (title["minLength"], title["maxLength"]) == (10, 80)
    assert (description["minLength"], description["maxLength"]) == (20, 400)
    objects = list(_objects(dict(js)))
    assert len(objects) == 2 and all(o["additionalProperties"] is False for o in objects)


@pytest.mark.parametrize("name", sorted(CATEGORIES))
def test_visual_attributes_are_enumerated_and_merchant_only_ones_are_not_generated(name: str) -> None:
    schema = CATEGORIES[name]
    assert "color" in schema.visual_attributes and "color" in schema.required_attributes
    for attr, values in schema.visual_attributes.items():
        assert values and len(values) == len(set(values)), attr
        assert schema.json_schema["properties"]["attributes"]["properties"][attr]["enum"] == values
    assert set(schema.required_attributes) <= set(schema.visual_attributes)
    assert {"material", "size", "brand"} <= set(schema.merchant_only_attributes)
    assert not (NON_VISUAL | set(schema.merchant_only_attributes)) & set(schema.visual_attributes)


def test_category_specific_attributes() -> None:
    assert "heel_height" in CATEGORIES["shoes"].visual_attributes and "sole" in CATEGORIES["shoes"].visual_attributes
    assert "brim" in CATEGORIES["hat"].visual_attributes
    assert {"sleeve_length", "neckline", "length"} <= set(CATEGORIES["dress"].visual_attributes)
    assert "closure" in CATEGORIES["outwear"].required_attributes


@pytest.mark.parametrize("name", sorted(DATASET_CATEGORIES))
def test_resolve_every_dataset_category(name: str) -> None:
    assert resolve_schema(name).name == name
    assert resolve_schema(f"  {name.upper()} ", unknown="reject").name == name


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tshirt", "t-shirt"), ("T Shirt", "t-shirt"), ("t_shirt", "t-shirt"), ("TEE", "t-shirt"),
        ("Long Sleeve", "longsleeve"), ("long-sleeve", "longsleeve"), ("Outerwear", "outwear"),
        ("jackets", "outwear"), ("jeans", "pants"), ("Trousers", "pants"), ("Dresses", "dress"),
        ("skirts", "skirt"), ("cap", "hat"), ("sneakers", "shoes"), ("sneaker", "shoes"),
    ],
)
def test_aliases(given: str, expected: str) -> None:
    assert resolve_schema(given, unknown="reject").name == expected


@pytest.mark.parametrize("given", ["lawnmower", "", "   ", "dress shirt pants"])
def test_unknown_category_generic_or_rejected(given: str) -> None:
    assert resolve_schema(given).name == "generic"
    with pytest.raises(UnsupportedCategory) as err:
        resolve_schema(given, unknown="reject")
    assert err.value.code == "unsupported_category" and not err.value.retryable


def test_unknown_policy_value_is_checked() -> None:
    with pytest.raises(ValueError):
        resolve_schema("dress", unknown="ignore")  # type: ignore[arg-type]


def test_load_schema_versions() -> None:
    assert load_schema("dress") is load_schema("dress", 1)
    with pytest.raises(UnsupportedCategory):
        load_schema("dress", 99)
    with pytest.raises(UnsupportedCategory):
        load_schema("spaceship")


@pytest.mark.parametrize("name", sorted(CATEGORIES))
def test_validate_listing_accepts_a_minimal_valid_listing(name: str) -> None:
    validate_listing(CATEGORIES[name], _valid_listing(name))


@pytest.mark.parametrize(
    "breakage",
    [
        lambda o: o.update(price="9.99"),
        lambda o: o["attributes"].update(material="cotton"),
        lambda o: o["attributes"].update(color="chartreuse"),
        lambda o: o.update(title="short"),
        lambda o: o.update(title="x" * 81),
        lambda o: o.update(description="y" * 401),
        lambda o: o["attributes"].pop("length"),
        lambda o: o.pop("attributes"),
    ],
)
def test_validate_listing_rejects(breakage) -> None:  # noqa: ANN001
    listing = _valid_listing("dress")
    breakage(listing)
    with pytest.raises(ValidationError):
        validate_listing(CATEGORIES["dress"], listing)
