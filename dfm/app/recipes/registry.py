"""The recipe registry: named functions returning a typed :class:`~dfm.app.config.TrainConfig`."""

from __future__ import annotations

from collections.abc import Callable

from dfm.app.config.errors import ConfigError, closest
from dfm.app.config.tree import TrainConfig

Recipe = Callable[[], TrainConfig]
_RECIPES: dict[str, Recipe] = {}


def register_recipe(fn: Recipe) -> Recipe:
    """Decorator: register ``fn`` under its function name (names are unique)."""
    name = fn.__name__
    assert name not in _RECIPES, f"recipe {name!r} registered twice"
    _RECIPES[name] = fn
    return fn


def recipe_names() -> list[str]:
    """Registered recipe names, in registration order."""
    return list(_RECIPES)


def recipe_summary(name: str) -> str:
    """First line of a recipe's docstring."""
    doc = _RECIPES[name].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def get_recipe(name: str) -> TrainConfig:
    """Build the config of the named recipe.

    Raises:
        ConfigError: (a ``ValueError``) for an unknown name, listing the known ones with a suggestion.
    """
    if name not in _RECIPES:
        near = closest(name, _RECIPES)
        hint = f"; did you mean {near!r}?" if near else ""
        raise ConfigError(f"unknown recipe {name!r}{hint} (known recipes: {', '.join(_RECIPES)})")
    return _RECIPES[name]()
