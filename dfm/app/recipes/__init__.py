"""Named recipes: functions returning a typed :class:`~dfm.app.config.TrainConfig`.

A recipe is the lowest configuration layer (YAML files and CLI overrides go over it). To add one,
write a function returning a ``TrainConfig`` in a module of this package, decorate it with
:func:`register_recipe` (the function name is the recipe name), document it in its docstring (the
first line shows in ``--list-recipes``), and add the module to ``_MODULES`` below if it is new.
"""

import importlib

from dfm.app.recipes.registry import get_recipe, recipe_names, recipe_summary, register_recipe

_MODULES = ("default", "wan", "dit", "tiny")
"""Modules holding recipes; their import order is the listing order."""

for _module in _MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["get_recipe", "recipe_names", "recipe_summary", "register_recipe"]
