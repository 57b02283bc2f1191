"""The cattrs converter of the config tree: strict scalars, tagged unions, all problems collected.

Structuring runs every attrs class in two steps: cattrs builds the instance with attrs validators
disabled (types, unknown keys), then each field's validator runs on its own, so that every bad value
of every section is reported with its key instead of only the first one.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError
from cattrs.gen import make_dict_structure_fn

from dfm.app.config.errors import FieldError, TypeMismatchError, closest, validator_reason
from dfm.app.config.typeinfo import (
    admits_none,
    describe,
    field_types,
    is_literal,
    is_sequence,
    is_union,
    non_none,
    tagged_union,
)

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeMismatchError("int", value)


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    raise TypeMismatchError("float", value)


def _structure_bool(value: Any, _: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise TypeMismatchError("bool (true/false)", value)


def _structure_str(value: Any, _: type) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeMismatchError("str", value)


def _structure_literal(value: Any, tp: Any) -> Any:
    options = typing.get_args(tp)
    if value in options and any(type(value) is type(o) for o in options):
        return value
    near = closest(value, [o for o in options if isinstance(o, str)]) if isinstance(value, str) else None
    raise TypeMismatchError(describe(tp), value, f"; did you mean {near!r}?" if near else "")


def _mapping_hook(cls: type, build: Callable[[Mapping[str, Any]], Any]) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeMismatchError(describe(cls), value)
        return build(value)

    return hook


def _validate_one(instance: Any, a: attrs.Attribute, value: Any) -> list[FieldError]:
    try:
        a.validator(instance, a, value)  # type: ignore[misc]
    except (ValueError, TypeError) as exc:
        return [FieldError((a.name,), validator_reason(exc, a.name, value))]
    except Exception:  # a validator that needs the instance, called without one
        if instance is not None:
            raise
    return []


def _validate_fields(instance: Any) -> list[FieldError]:
    problems = []
    for a in attrs.fields(type(instance)):
        if a.validator is not None:
            problems.extend(_validate_one(instance, a, getattr(instance, a.name)))
    return problems


class ConfigConverter(cattrs.Converter):
    """A :class:`cattrs.Converter` for the config tree (``forbid_extra_keys=True``, detailed validation).

    Hooks: strict ``int``/``float``/``bool``/``str``, ``Literal`` with did-you-mean, tuples from
    lists, optionals and plain unions, tagged unions of attrs classes (see
    :mod:`dfm.app.config.typeinfo`), and attrs classes whose validators all run and report by key.
    """

    def __init__(self) -> None:
        super().__init__(forbid_extra_keys=True, detailed_validation=True)
        for tp, fn in (
            (int, _structure_int),
            (float, _structure_float),
            (bool, _structure_bool),
            (str, _structure_str),
        ):
            self.register_structure_hook(tp, fn)
        self.register_structure_hook_func(is_literal, _structure_literal)
        self.register_structure_hook_func(is_sequence, self._structure_sequence)
        self.register_structure_hook_func(is_union, self._structure_union)
        self.register_structure_hook_factory(attrs.has, self._attrs_hook)
        self.register_unstructure_hook_func(is_sequence, self._unstructure_sequence)

    def _attrs_hook(self, cls: type) -> Callable[[Any, Any], Any]:
        generated = make_dict_structure_fn(cls, self)

        def build(value: Mapping[str, Any]) -> Any:
            try:
                with attrs.validators.disabled():
                    instance = generated(value, cls)
            except ClassValidationError as exc:
                if more := self._validate_given_fields(cls, value, exc):
                    raise ClassValidationError(exc.message, [*exc.exceptions, *more], cls) from None
                raise
            if problems := _validate_fields(instance):
                raise ClassValidationError(f"While validating {cls.__name__}", problems, cls)
            return instance

        return _mapping_hook(cls, build)

    def _validate_given_fields(
        self, cls: type, value: Mapping[str, Any], exc: ClassValidationError
    ) -> list[FieldError]:
        """When some fields of ``cls`` failed to structure, still run the validators of the given ones that did not.

        Validators get no instance here; one that needs it is skipped (the next run reports it).
        """
        failed = {note.name for e in exc.exceptions for note in getattr(e, "__notes__", ()) if hasattr(note, "name")}
        types, problems = field_types(cls), []
        for a in attrs.fields(cls):
            if (
                a.name in failed
                or a.name not in value
                or a.validator is None
                or isinstance(a.converter, attrs.Converter)
            ):
                continue
            try:
                field_value = self.structure(value[a.name], types[a.name])
                field_value = a.converter(field_value) if a.converter is not None else field_value
            except Exception:  # reported by the run that raised ``exc`` or by the next one
                continue
            problems.extend(_validate_one(None, a, field_value))
        return problems

    def _structure_sequence(self, value: Any, tp: Any) -> Any:
        args = typing.get_args(tp)
        variadic = typing.get_origin(tp) is list or not args or (len(args) == 2 and args[1] is Ellipsis)
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, list | tuple):
            raise TypeMismatchError(describe(tp), value)
        if not variadic and typing.get_origin(tp) is tuple and len(value) != len(args):
            raise TypeMismatchError(describe(tp), value)
        item_types = [args[0] if args else Any] * len(value) if variadic else list(args)
        try:
            items = [v if t is Any else self.structure(v, t) for v, t in zip(value, item_types, strict=True)]
        except TypeMismatchError:
            raise TypeMismatchError(describe(tp), value) from None
        return tuple(items) if typing.get_origin(tp) is tuple else items

    def _unstructure_sequence(self, value: Any) -> list[Any]:
        return [self.unstructure(v) for v in value]

    def _structure_union(self, value: Any, tp: Any) -> Any:
        if value is None and admits_none(tp):
            return None
        union = tagged_union(tp)
        if union is not None:
            return self._structure_tagged(value, tp)
        members = non_none(tp)
        for member in members:
            try:
                return self.structure(value, member)
            except TypeMismatchError:
                continue
        raise TypeMismatchError(describe(tp), value)

    def _structure_tagged(self, value: Any, tp: Any) -> Any:
        union = tagged_union(tp)
        assert union is not None
        tags = ", ".join(map(repr, union.variants))
        if not isinstance(value, Mapping):
            raise TypeMismatchError(f"a mapping with {union.tag!r} one of {tags}", value)
        tag = value.get(union.tag, union.default_tag)
        if tag not in union.variants:
            near = closest(tag, union.variants) if isinstance(tag, str) else None
            hint = f"; did you mean {near!r}?" if near else ""
            raise FieldError((union.tag,), f"expected one of {tags}, got {tag!r}{hint}")
        return self.structure(value, union.variants[tag])


CONVERTER = ConfigConverter()
"""The converter used by :mod:`dfm.app.config` (hooks are generated lazily and cached per type)."""
