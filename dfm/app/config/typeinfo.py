"""Type introspection shared by structuring, layering and documentation of the config tree.

A *tagged union* is a union of attrs classes that share a single-valued ``Literal`` field, e.g.
``WanSpec | DiTSpec`` (tag ``arch``) or ``FlowMatching | EDM`` (tag ``kind``); the tag value in a
mapping picks the class. Detection is generic, so a new variant only needs its tag field.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs

NoneType = type(None)


@attrs.frozen
class TaggedUnion:
    """A union of attrs classes told apart by the value of one field."""

    tag: str
    """Name of the tag field (``arch``, ``kind``)."""
    variants: dict[str, type]
    """Tag value -> class, in the union's order (the first is the default)."""

    @property
    def default_tag(self) -> str:
        """Tag of the first variant, used when a mapping has no tag."""
        return next(iter(self.variants))


def is_union(tp: Any) -> bool:
    """Whether ``tp`` is ``X | Y`` or ``typing.Union[X, Y]``."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def is_literal(tp: Any) -> bool:
    """Whether ``tp`` is a ``Literal[...]``."""
    return typing.get_origin(tp) is Literal


def is_sequence(tp: Any) -> bool:
    """Whether ``tp`` is a ``tuple[...]`` or ``list[...]`` type (what a CLI ``1,2,3`` value targets)."""
    return typing.get_origin(tp) in (tuple, list)


def non_none(tp: Any) -> tuple[Any, ...]:
    """Members of a union other than ``None`` (``(tp,)`` for a non-union)."""
    return tuple(m for m in typing.get_args(tp) if m is not NoneType) if is_union(tp) else (tp,)


def admits_none(tp: Any) -> bool:
    """Whether ``None`` is a valid value of ``tp``."""
    return tp is NoneType or (is_union(tp) and NoneType in typing.get_args(tp))


def is_str_like(tp: Any) -> bool:
    """Whether every non-None member of ``tp`` is ``str`` or a ``Literal`` of strings."""
    members = non_none(tp)
    return bool(members) and all(
        m is str or (is_literal(m) and all(isinstance(a, str) for a in typing.get_args(m))) for m in members
    )


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every attrs field of ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {a.name: hints.get(a.name, a.type) for a in attrs.fields(cls)}


def _single_literal(tp: Any) -> str | None:
    args = typing.get_args(tp) if is_literal(tp) else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


@functools.cache
def tagged_union(tp: Any) -> TaggedUnion | None:
    """The :class:`TaggedUnion` view of ``tp``, or None if ``tp`` is not a union of tagged attrs classes."""
    members = typing.get_args(tp) if is_union(tp) else ()
    if len(members) < 2 or not all(isinstance(m, type) and attrs.has(m) for m in members):
        return None
    for name in field_types(members[0]):
        tags = [_single_literal(field_types(m).get(name)) for m in members]
        if all(tags) and len(set(tags)) == len(tags):
            return TaggedUnion(tag=name, variants={t: m for t, m in zip(tags, members, strict=True)})  # type: ignore[misc]
    return None


def section_class(tp: Any, data: Any) -> type | None:
    """The attrs class a mapping at a field of type ``tp`` structures into (tag-resolved), or None."""
    if isinstance(tp, type) and attrs.has(tp):
        return tp
    union = tagged_union(tp)
    if union is None:
        return None
    tag = data.get(union.tag, union.default_tag) if isinstance(data, Mapping) else union.default_tag
    return union.variants.get(tag) if isinstance(tag, str) else None


def describe(tp: Any) -> str:
    """Human description of a type for error messages: ``int``, ``one of 'a', 'b'``, ``a list of 2 floats``."""
    if tp is NoneType:
        return "null"
    if is_union(tp):
        return " or ".join(describe(m) for m in non_none(tp)) + (" or null" if admits_none(tp) else "")
    if is_literal(tp):
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if is_sequence(tp):
        return _describe_sequence(tp)
    if isinstance(tp, type) and attrs.has(tp):
        return f"a mapping ({tp.__name__} section)"
    return getattr(tp, "__name__", repr(tp))


def _describe_sequence(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list or not args or (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {describe(args[0]) + 's' if args else 'values'}"
    if len(set(args)) == 1:
        return f"a list of {len(args)} {describe(args[0])}s"
    return "a list [" + ", ".join(describe(a) for a in args) + "]"
