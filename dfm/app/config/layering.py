"""Layering: named recipe < YAML file < dotted ``key.sub=value`` CLI overrides, then one validation.

Merging is type-aware: a CLI value is read as the type of the field it targets, and setting a tagged
union's tag to another value (``model.arch=dit``, ``diffusion: {kind: edm}``) restarts that section
from the new variant's defaults plus the keys given alongside the tag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from dfm.app.config.errors import ConfigError
from dfm.app.config.serialize import config_from_dict, config_to_dict, load_yaml
from dfm.app.config.tree import TrainConfig
from dfm.app.config.typeinfo import (
    admits_none,
    field_types,
    is_sequence,
    is_str_like,
    non_none,
    section_class,
    tagged_union,
)

_NULLS = frozenset({"null", "none", "~"})


@attrs.frozen
class Override:
    """A CLI value not yet typed: it is read once the target field's type is known."""

    raw: str
    """The text after ``=``."""


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "model.arch=dit"]`` -> nested dict with :class:`Override` leaves.

    Raises:
        ConfigError: An item that is not ``key=value`` with a dotted key of non-empty parts.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. train.max_steps=100")
        node = tree
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = Override(raw)
    return tree


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def read_override(raw: str, tp: Any) -> Any:
    """Read CLI text as a value of type ``tp`` (None when the key is unknown: plain YAML).

    ``null``/``none`` give None where the type allows it; string and choice fields take the text as
    is; list and tuple fields accept ``[1, 2]``, ``(1, 2)`` or ``1,2``; everything else is read as YAML
    (``true``/``false``/``yes``/``no``, numbers) and checked by the converter.
    """
    if tp is not None and admits_none(tp) and raw.strip().lower() in _NULLS:
        return None
    if tp is not None and is_str_like(tp):
        return raw
    value = _yaml_value(raw)
    if tp is not None and is_sequence(_strip_none(tp)) and isinstance(value, str) and "," in value:
        inner = value.strip()
        if inner[:1] + inner[-1:] in ("()", "[]"):
            inner = inner[1:-1]
        return [_yaml_value(p.strip()) for p in inner.split(",")]
    return value


def _strip_none(tp: Any) -> Any:
    members = non_none(tp)
    return members[0] if len(members) == 1 else tp


def _tag_value(value: Any) -> Any:
    return value.raw.strip() if isinstance(value, Override) else value


def _section_base(tp: Any, old: Any, new: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping ``new`` merges into: ``old``, or a fresh ``{tag: ...}`` when the union tag changes."""
    base = dict(old) if isinstance(old, Mapping) else {}
    union = tagged_union(tp) if tp is not None else None
    if union is not None and union.tag in new:
        tag = _tag_value(new[union.tag])
        if tag != base.get(union.tag):
            return {union.tag: tag}
    return base


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any], cls: type | None = TrainConfig) -> dict[str, Any]:
    """Merge ``overlay`` over ``base`` (both plain nested dicts) for the attrs class ``cls``.

    Mappings merge key by key; other values replace. :class:`Override` leaves are read as their
    field's type. Unknown keys are kept so that structuring reports them with a suggestion.
    """
    out = dict(base)
    types = field_types(cls) if cls is not None else {}
    for key, new in overlay.items():
        tp = types.get(key)
        if isinstance(new, Mapping):
            section = _section_base(tp, out.get(key), new)
            resolved = {k: _tag_value(v) for k, v in new.items()}
            out[key] = merge(section, new, section_class(tp, {**section, **resolved}) if tp is not None else None)
        elif isinstance(new, Override):
            out[key] = read_override(new.raw, tp)
        else:
            out[key] = new
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a (partial) YAML config file into a plain dict.

    Raises:
        ConfigError: A missing or unreadable file, invalid YAML, or a top level that is not a mapping.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    return load_yaml(text, source=str(path))


RECIPE_KEY = "recipe"
"""Top-level key of a YAML config file naming the recipe it starts from (so one file says everything)."""


def _base_recipe(cli: str | None, from_file: object, config_file: Path | None) -> str:
    """The recipe to start from: ``--recipe``, else the file's ``recipe:`` key, else ``default``.

    Raises:
        ConfigError: the file's ``recipe`` is not a string, or differs from ``--recipe``.
    """
    if from_file is not None and not isinstance(from_file, str):
        raise ConfigError(f"{config_file}: recipe: expected a recipe name, got {from_file!r}")
    if cli is not None and from_file is not None and cli != from_file:
        raise ConfigError(f"--recipe {cli} differs from recipe: {from_file} in {config_file}; give one of them")
    return cli or from_file or "default"


def resolve_config(recipe: str | None, config_file: Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Resolve the effective config: recipe < YAML file < CLI overrides, validated once at the end.

    Args:
        recipe: Name of a registered recipe (see :mod:`dfm.app.recipes`); None uses the file's top-level
            ``recipe:`` key, else ``default``.
        config_file: A YAML file with a partial nested config merged over the recipe, or None. Its
            optional top-level ``recipe: NAME`` names the recipe it starts from.
        overrides: Dotted ``key.sub=value`` items, applied in order (a later item wins).

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        ConfigError: An unknown recipe, file problems, or every invalid key and value, one per line.
    """
    from dfm.app.recipes import get_recipe  # recipes build TrainConfig; import late to avoid a cycle

    overlay = load_config_file(config_file) if config_file is not None else {}
    recipe = _base_recipe(recipe, overlay.pop(RECIPE_KEY, None), config_file)
    data = config_to_dict(get_recipe(recipe))
    if config_file is not None:
        data = merge(data, overlay)
    data = merge(data, parse_overrides(overrides))
    return config_from_dict(data)
