"""dfm.app.logging: JSON lines with rank and step; rank 0 only unless all_ranks."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from dfm.app.logging import bind_step, configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_events_carry_rank_and_step() -> None:
    stream = io.StringIO()
    configure_logging(rank=0, fmt="json", stream=stream)
    bind_step(7)
    get_logger("dfm.test").info("step done", loss=0.5)
    bind_step(None)
    get_logger("dfm.test").info("after")
    first, second = lines(stream)
    assert first["event"] == "step done" and first["loss"] == 0.5
    assert first["rank"] == 0 and first["step"] == 7 and first["level"] == "info"
    assert first["logger"] == "dfm.test" and "timestamp" in first
    assert "step" not in second


def test_auto_format_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging(fmt="auto", stream=stream)
    get_logger("dfm.test").info("hello")
    assert lines(stream)[0]["event"] == "hello"


def test_console_format_is_human_readable() -> None:
    stream = io.StringIO()
    configure_logging(fmt="console", stream=stream)
    get_logger("dfm.test").info("hello", answer=42)
    text = stream.getvalue()
    assert "hello" in text and "answer=42" in text and not text.startswith("{")


def test_nonzero_rank_is_silent_by_default() -> None:
    stream = io.StringIO()
    configure_logging(rank=1, fmt="json", stream=stream)
    get_logger("dfm.test").info("progress")
    logging.getLogger("thirdparty.module").info("foreign progress")
    assert stream.getvalue() == ""


def test_nonzero_rank_still_reports_warnings() -> None:
    stream = io.StringIO()
    configure_logging(rank=3, fmt="json", stream=stream)
    get_logger("dfm.test").warning("bad batch")
    assert lines(stream)[0]["rank"] == 3


def test_all_ranks_emits_from_every_rank() -> None:
    stream = io.StringIO()
    configure_logging(rank=1, fmt="json", all_ranks=True, stream=stream)
    get_logger("dfm.test").info("progress")
    assert lines(stream)[0]["rank"] == 1


def test_stdlib_records_are_rendered_with_rank() -> None:
    stream = io.StringIO()
    configure_logging(rank=0, fmt="json", stream=stream)
    bind_step(3)
    logging.getLogger("thirdparty.module").warning("foreign %s", "warning")
    (event,) = lines(stream)
    assert event["event"] == "foreign warning" and event["rank"] == 0 and event["step"] == 3


def test_level_filters_and_reconfiguring_does_not_duplicate() -> None:
    stream = io.StringIO()
    configure_logging(level="WARNING", fmt="json", stream=stream)
    configure_logging(level="WARNING", fmt="json", stream=stream)
    get_logger("dfm.test").info("hidden")
    get_logger("dfm.test").error("shown")
    assert [e["event"] for e in lines(stream)] == ["shown"]


def test_bad_level_or_format() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging(level="LOUD", stream=io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        configure_logging(fmt="xml", stream=io.StringIO())  # type: ignore[arg-type]
