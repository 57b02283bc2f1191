"""The configuration reference (``docs/configuration.md``), generated from the config classes.

``python -m dfm.app.config.reference`` prints it; a test keeps the committed file in step.
"""

from __future__ import annotations

import attrs

from dfm.app.config.docs import attribute_docs
from dfm.app.config.serialize import config_to_dict
from dfm.app.config.tree import TrainConfig
from dfm.app.config.typeinfo import field_types, tagged_union

BEGIN = "<!-- BEGIN GENERATED: python -m dfm.app.config.reference -->"
END = "<!-- END GENERATED -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(prefix: str, cls: type, defaults: dict) -> list[str]:
    return ["| key | default | meaning |", "|---|---|---|", *_rows(prefix, cls, defaults)]


def _rows(prefix: str, cls: type, defaults: dict) -> list[str]:
    """One row per key; a nested section's keys follow under its dotted name."""
    docs, types = attribute_docs(cls), field_types(cls)
    rows = []
    for field in attrs.fields(cls):
        value = defaults.get(field.name)
        if attrs.has(types[field.name]) and isinstance(value, dict):
            rows += _rows(f"{prefix}{field.name}.", types[field.name], value)
        else:
            rows.append(f"| `{prefix}{field.name}` | `{_cell(value)}` | {_cell(docs.get(field.name, ''))} |")
    return rows


def _section(name: str, tp: object, defaults: dict) -> list[str]:
    union = tagged_union(tp)
    if union is None:
        return [f"### `{name}`", "", *_table(f"{name}.", tp, defaults), ""]  # type: ignore[arg-type]
    out = [f"### `{name}` (choose with `{name}.{union.tag}`)", ""]
    for tag, cls in union.variants.items():
        out += [f"#### `{name}.{union.tag}: {tag}` ({cls.__name__})", ""]
        out += [*_table(f"{name}.", cls, config_to_dict_section(cls)), ""]
    return out


def config_to_dict_section(cls: type) -> dict:
    """The unstructured defaults of one config class."""
    return config_to_dict(cls())  # type: ignore[arg-type]


def render_reference() -> str:
    """Markdown tables: every section and key of :class:`TrainConfig` with its default and meaning."""
    defaults = config_to_dict(TrainConfig())
    docs = attribute_docs(TrainConfig)
    lines = [BEGIN, "", "Defaults below are the classes' own; a recipe sets its own values on top.", ""]
    for field in attrs.fields(TrainConfig):
        tp = field_types(TrainConfig)[field.name]
        if attrs.has(tp) or tagged_union(tp) is not None:
            lines += _section(field.name, tp, defaults[field.name])
        else:
            doc = docs.get(field.name, "")
            lines += [f"### `{field.name}`", "", f"`{field.name}: {defaults[field.name]}` — {doc}", ""]
    return "\n".join([*lines, END]) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
