"""Attribute docstrings of config classes, read from their source (the string after each field)."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import attrs

from dfm.app.config.typeinfo import field_types, non_none, tagged_union


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the attrs class ``cls`` and its attrs base classes.

    A field's docstring is the string literal right after its annotated assignment; fields without
    one are missing from the result.
    """
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if attrs.has(k)]):
        docs.update(_class_body_docs(klass))
    return {a.name: docs[a.name] for a in attrs.fields(cls) if a.name in docs}


def _class_body_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs: dict[str, str] = {}
    for stmt, nxt in zip(node.body, node.body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and _is_docstring(nxt):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def config_classes(root: type) -> Iterator[type]:
    """Every attrs class reachable from ``root`` through field types (tagged-union variants included)."""
    seen: set[type] = set()
    stack = [root]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        for tp in field_types(cls).values():
            stack.extend(_attrs_members(tp))


def _attrs_members(tp: Any) -> list[type]:
    union = tagged_union(tp)
    if union is not None:
        return list(union.variants.values())
    return [m for m in non_none(tp) if isinstance(m, type) and attrs.has(m)]
