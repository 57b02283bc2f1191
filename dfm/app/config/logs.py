"""The ``logging`` section: level, format and which ranks emit."""

from __future__ import annotations

from typing import Literal

import attrs

from dfm.app.config.checks import choice

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["auto", "console", "json"]


@attrs.frozen(kw_only=True)
class LoggingConfig:
    """Structured logging (see :func:`dfm.app.logging.configure_logging`)."""

    level: LogLevel = attrs.field(default="INFO", validator=choice(LogLevel))
    """Lowest level emitted."""
    format: LogFormat = attrs.field(default="auto", validator=choice(LogFormat))
    """``console`` (human), ``json`` (one object per line) or ``auto`` (console on a terminal, else JSON)."""
    all_ranks: bool = False
    """Emit from every rank; by default ranks other than 0 emit warnings and errors only."""
