"""User-facing configuration errors and their formatting.

Every problem a user can cause in a config (an unknown key, a value of the wrong type, a value out of
range) ends up as one line ``<dotted.key>: <what is wrong>``; :class:`ConfigError` carries all of them,
one per line, so a user fixes every mistake in one go.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from cattrs.errors import AttributeValidationNote, ForbiddenExtraKeysError, IterableValidationNote

Path = tuple[str | int, ...]


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message lists every problem, one per line.

    Attributes:
        problems: The problems, each ``"<dotted.key>: <reason>"`` (or a bare reason without a key).
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(dict.fromkeys(problems))
        super().__init__("\n".join(self.problems))


class FieldError(ValueError):
    """A bad value at a known (relative) key, raised by validators and structuring hooks.

    Attributes:
        path: Key path relative to the section that raised it.
        reason: What is wrong, e.g. ``"must be > 0, got -1"``.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path: Path = tuple(path.split(".")) if isinstance(path, str) else tuple(path)
        self.reason = reason
        super().__init__(f"{dotted(self.path)}: {reason}" if self.path else reason)


class TypeMismatchError(TypeError):
    """A value that cannot be read as the expected type.

    Attributes:
        expected: Description of the expected type, e.g. ``"int"`` or ``"one of 'a', 'b'"``.
        value: The offending value.
        hint: Optional suffix such as ``"; did you mean 'bf16'?"``.
    """

    def __init__(self, expected: str, value: Any, hint: str = "") -> None:
        self.expected, self.value, self.hint = expected, value, hint
        super().__init__(f"expected {expected}, got {value!r}{hint}")


def dotted(path: Path) -> str:
    """``("model", "patch_size", 0)`` -> ``"model.patch_size[0]"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (case-insensitive, difflib ratio >= 0.6), or None."""
    by_lower = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def unknown_key_message(path: Path, key: str, valid: Iterable[str]) -> str:
    """``model.num_layer: unknown key; did you mean model.num_layers?`` (no suggestion if none is close)."""
    suggestion = closest(key, valid)
    message = f"{dotted((*path, key))}: unknown key"
    return f"{message}; did you mean {dotted((*path, suggestion))}?" if suggestion else message


def validator_reason(exc: BaseException, name: str, value: Any) -> str:
    """Turn an attrs validator error into ``must be > 0, got -1.0`` (strip the name, end with the value)."""
    message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    message = re.sub(rf"^Length of '{re.escape(name)}'", "length", message)
    message = re.sub(rf"^'?{re.escape(name)}'?(:\s*|\s+)", "", message)
    for pattern in (rf"^(.*?):\s*{re.escape(str(value))}\.?$", r"^(.*?)\s*\(got .*\)\.?$"):
        if match := re.match(pattern, message, flags=re.S):
            return f"{match[1]}, got {value!r}"
    return message


def problems_from_exception(exc: BaseException, path: Path = ()) -> list[str]:
    """Flatten a (nested) cattrs validation error into ``dotted.key: reason`` lines."""
    if isinstance(exc, BaseExceptionGroup):
        return [line for sub in exc.exceptions for line in problems_from_exception(sub, path + _note_path(sub))]
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        return [unknown_key_message(path, key, valid) for key in sorted(map(str, exc.extra_fields))]
    if isinstance(exc, FieldError):
        return [_line(path + exc.path, exc.reason)]
    if isinstance(exc, TypeMismatchError | ConfigError):
        return [_line(path, line) for line in str(exc).splitlines()]
    if isinstance(exc, KeyError):
        return [_line(path, "required key missing")]
    return [_line(path, exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc))]


def _note_path(exc: BaseException) -> Path:
    parts: list[str | int] = []
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            parts.append(note.name)
        elif isinstance(note, IterableValidationNote):
            parts.append(int(note.index))
    return tuple(parts)


def _line(path: Path, reason: str) -> str:
    return f"{dotted(path)}: {reason}" if path else reason
