"""Small attrs validators shared by the config sections (all raise ``ValueError``)."""

from __future__ import annotations

import math
import typing
from typing import Any

from attrs import validators as v

positive = v.gt(0)
"""Value > 0."""
non_negative = v.ge(0)
"""Value >= 0."""


def finite(_inst: object, attr: Any, value: Any) -> None:
    """Validator rejecting ``inf``, ``-inf`` and ``nan`` (put it before a range check: ``inf > 0`` holds)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{attr.name} must be a finite number, got {value!r}")


finite_positive = v.and_(finite, v.gt(0.0))
"""A finite value > 0."""
finite_non_negative = v.and_(finite, v.ge(0.0))
"""A finite value >= 0."""
unit_interval = v.and_(finite, v.ge(0.0), v.le(1.0))
"""Value in [0, 1]."""


def non_empty(_inst: object, attr: Any, value: Any) -> None:
    """Validator rejecting an empty string."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{attr.name} must not be empty")


def choice(literal: Any) -> Any:
    """Validator accepting exactly the values of ``Literal[...]`` type ``literal``."""
    return v.in_(typing.get_args(literal))


def optional(validator: Any) -> Any:
    """Validator accepting ``None`` or what ``validator`` accepts."""
    return v.optional(validator)
