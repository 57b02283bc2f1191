"""Structured logging for dfm: structlog over the standard library's logging.

Every event carries ``rank`` and, once :func:`bind_step` was called, ``step``. Records of other
libraries that log through the standard library (torch, megatron) go through the same renderer.

Rank policy: rank 0 emits everything at or above ``level``; other ranks emit only warnings and
errors (a problem on one rank is never hidden, progress is not repeated N times), unless
``all_ranks=True``. Output goes to stderr so that stdout stays clean for what a CLI prints.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.types import EventDict, Processor

LogFormat = Literal["auto", "console", "json"]

_handler: logging.Handler | None = None


class _RankFilter(logging.Filter):
    """Lets every record through on rank 0 (or with all_ranks), else warnings and errors only."""

    def __init__(self, *, rank: int, all_ranks: bool) -> None:
        super().__init__()
        self.open = all_ranks or rank == 0

    def filter(self, record: logging.LogRecord) -> bool:
        return self.open or record.levelno >= logging.WARNING


def _add_rank(rank: int) -> Processor:
    def add_rank(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("rank", rank)
        return event_dict

    return add_rank


def _renderer(fmt: LogFormat, stream: TextIO) -> Processor:
    if fmt not in ("auto", "console", "json"):
        raise ValueError(f"log format must be 'auto', 'console' or 'json', got {fmt!r}")
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    if console:
        return structlog.dev.ConsoleRenderer(colors=hasattr(stream, "isatty") and stream.isatty())
    return structlog.processors.JSONRenderer()


def _level_number(level: str | int) -> int:
    number = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return number


def configure_logging(
    *,
    rank: int = 0,
    level: str | int = "INFO",
    fmt: LogFormat = "auto",
    all_ranks: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the root stdlib logger for this process (idempotent).

    Args:
        rank: This process's global rank, bound into every event.
        level: Lowest level emitted (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``).
        fmt: ``console`` (human), ``json`` (one JSON object per line) or ``auto`` (console on a
            terminal, JSON otherwise).
        all_ranks: Emit from every rank; by default ranks other than 0 emit warnings and errors only.
        stream: Where to write (default: ``sys.stderr`` at call time).

    Raises:
        ValueError: An unknown level or format.
    """
    global _handler
    stream = stream if stream is not None else sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_rank(rank),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(fmt, stream),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_RankFilter(rank=rank, all_ranks=all_ranks))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(_level_number(level))
    _handler = handler
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use ``__name__``)."""
    return structlog.stdlib.get_logger(name)


def bind_step(step: int | None) -> None:
    """Bind the training step into every following event of this context; None removes it."""
    if step is None:
        structlog.contextvars.unbind_contextvars("step")
    else:
        structlog.contextvars.bind_contextvars(step=int(step))
