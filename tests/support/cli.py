"""Run dfm's CLIs as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m dfm.app.<module> ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"dfm.app.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
