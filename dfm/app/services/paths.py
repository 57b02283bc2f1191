"""Up-front checks that an output path can be written, made before any slow work (loading models, sampling,
encoding), so that a bad ``--out`` is a clear error instead of a traceback at the end of a long run.

Nothing is created: the nearest existing ancestor of the path must be a directory in which a file can be
made (a probe file is created there and removed at once), so missing directories below it can be created later.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PROBE_PREFIX = ".dfm-write-probe-"
"""Name prefix of the empty file created and removed at once to prove that a directory is writable."""


def check_output_file(path: Path, *, option: str) -> None:
    """Raise a ``ValueError`` naming ``option`` unless a regular file can be written at ``path``.

    Raises:
        ValueError: ``path`` is a directory, a directory above it is a file, or its directory cannot be written.
    """
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; name a file to write")
    _check_can_create_in(path.parent, option=option, target=path)


def check_output_dir(path: Path, *, option: str) -> None:
    """Raise a ``ValueError`` naming ``option`` unless ``path`` is, or can be created as, a writable directory.

    Raises:
        ValueError: ``path`` is an existing file, a directory above it is a file, or it cannot be written.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is an existing file, not a directory; name a directory (created if missing)")
    _check_can_create_in(path, option=option, target=path)


def _check_can_create_in(directory: Path, *, option: str, target: Path) -> None:
    """``directory`` (or, where it is missing, its nearest existing ancestor) is a directory one can write in."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise ValueError(f"{option} {target}: {existing} is a file, not a directory; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{option} {target}: cannot write in {existing} ({reason}); choose another {option}") from None
    os.close(fd)
    os.unlink(probe)


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its ancestors that exists (``.`` for a relative path with none)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")
