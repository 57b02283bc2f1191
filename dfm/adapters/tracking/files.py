"""Files a run rewrites (``metrics.jsonl``, ``config.yaml``): replaced whole or not at all."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: written to a temporary file beside it, synced, then renamed over it.

    Raises:
        OSError: When writing fails (the temporary file is removed; ``path`` is untouched).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
