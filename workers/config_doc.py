"""Render every setting as a Markdown table (the README's configuration section is this output)."""

from __future__ import annotations

from pydantic import BaseModel

from workers.settings import Settings


def _default(field) -> str:  # noqa: ANN001
    if field.default_factory is not None:
        value = field.default_factory()
        return "(derived)" if not isinstance(value, list) else str(value)
    value = field.default
    if value is None:
        return "—"
    return f"`{getattr(value, 'value', value)}`"


def settings_rows() -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, subfield in annotation.model_fields.items():
                rows.append((f"ENRICH_{name.upper()}__{sub.upper()}", _default(subfield), subfield.description or ""))
        else:
            rows.append((f"ENRICH_{name.upper()}", _default(field), field.description or ""))
    return rows


def settings_markdown() -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | {d} | {m.replace('|', '/')} |" for n, d, m in settings_rows()]
    return "\n".join(lines)
