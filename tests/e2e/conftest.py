"""Fixtures for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.mounts import tmpfs


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 3 MiB tmpfs (skips where mounting is not permitted)."""
    with tmpfs(tmp_path / "small", "size=3m") as mount_point:
        yield mount_point
