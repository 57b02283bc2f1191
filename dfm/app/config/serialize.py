"""Typed config <-> plain dict <-> YAML text.

A plain dict holds YAML-safe values only (dicts, lists, str, int, float, bool, None), so
``config_to_yaml(config_from_yaml(text)) == text`` for any text ``config_to_yaml`` wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import yaml
from cattrs.errors import BaseValidationError

from dfm.app.config.converter import CONVERTER
from dfm.app.config.errors import ConfigError, FieldError, TypeMismatchError, problems_from_exception
from dfm.app.config.tree import TrainConfig

T = TypeVar("T")


def structure(data: Any, cls: type[T]) -> T:
    """Build a typed config (or one section) from plain data; every problem goes into one error.

    Args:
        data: A mapping as read from YAML.
        cls: The attrs class to build, e.g. :class:`TrainConfig`.

    Raises:
        ConfigError: Unknown keys, wrong types or values out of range, one line per problem.
    """
    try:
        return CONVERTER.structure(data, cls)
    except (BaseValidationError, FieldError, TypeMismatchError) as exc:
        raise ConfigError(problems_from_exception(exc)) from None


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a (possibly partial) plain dict; missing keys take class defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {data!r}")
    return structure(data, TrainConfig)


def plain(value: Any) -> Any:
    """Recursively turn tuples into lists and mappings into dicts (YAML-safe)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Unstructure a config (or one section) into a plain, YAML-safe dict."""
    return plain(CONVERTER.unstructure(config))


class _Dumper(yaml.SafeDumper):
    """Safe dumper writing mappings as blocks and lists inline (``patch_size: [1, 2, 2]``)."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flat = all(not isinstance(v, dict | list) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text of a plain dict: keys in field order, mappings as blocks, flat lists inline."""
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def config_to_yaml(config: TrainConfig) -> str:
    """The config as YAML text (what ``--dry-run`` prints and the run directory stores)."""
    return dump_yaml(config_to_dict(config))


def load_yaml(text: str, *, source: str = "<string>") -> dict[str, Any]:
    """Parse YAML text into a mapping (empty text gives ``{}``).

    Raises:
        ConfigError: Invalid YAML, or a top level that is not a mapping.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def config_from_yaml(text: str, *, source: str = "<string>") -> TrainConfig:
    """Build a :class:`TrainConfig` from YAML text (missing keys take class defaults)."""
    return config_from_dict(load_yaml(text, source=source))
