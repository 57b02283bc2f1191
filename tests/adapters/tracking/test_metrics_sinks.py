"""Metrics sinks: JSONL on real files (resume, crash repair, NaN), TensorBoard, and the in-memory adapters."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dfm.adapters.memory import InMemoryMetricsSink, InMemoryVideoWriter
from dfm.adapters.tracking import JsonlMetricsSink, TensorBoardMetricsSink, read_metrics
from dfm.ports.tracking import MetricsSink, VideoWriter

jsonl_module = importlib.import_module("dfm.adapters.tracking.jsonl")
tensorboard_module = importlib.import_module("dfm.adapters.tracking.tensorboard")


def strict_lines(path: Path) -> list[dict[str, object]]:
    """Every line parsed as strict JSON (``NaN``/``Infinity`` tokens refused)."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_sinks_implement_the_ports(tmp_path: Path) -> None:
    with JsonlMetricsSink(tmp_path / "m.jsonl") as sink:
        assert isinstance(sink, MetricsSink)
    assert isinstance(InMemoryMetricsSink(), MetricsSink)
    assert isinstance(InMemoryVideoWriter(), VideoWriter)


def test_one_line_per_step_with_converted_values(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonlMetricsSink(path)
    sink.log(1, {"loss": torch.tensor(0.5), "lr": 1e-4, "tokens": torch.tensor(7)})
    sink.log(2, {"loss": np.float32(0.25), "grad_norm": np.array([2.0]), "note": "ok", "skipped": True})
    assert path.read_text().count("\n") == 2  # flushed before close
    sink.close()
    sink.close()
    assert strict_lines(path) == [
        {"step": 1, "loss": 0.5, "lr": 1e-4, "tokens": 7},
        {"step": 2, "loss": 0.25, "grad_norm": 2.0, "note": "ok", "skipped": True},
    ]
    assert read_metrics(path) == strict_lines(path)


def test_non_finite_values_are_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with JsonlMetricsSink(path) as sink:
        sink.log(3, {"loss": math.nan, "grad_norm": torch.tensor(math.inf), "x": -math.inf, "y": None})
    assert strict_lines(path) == [{"step": 3, "loss": "nan", "grad_norm": "inf", "x": "-inf", "y": None}]
    (record,) = read_metrics(path)
    assert math.isnan(record["loss"]) and record["grad_norm"] == math.inf and record["x"] == -math.inf


def test_resume_appends_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with JsonlMetricsSink(path) as sink:
        sink.log(1, {"loss": 1.0})
    with JsonlMetricsSink(path) as sink:
        assert not sink.repaired and sink.dropped == 0
        sink.log(2, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_resume_step_drops_records_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with JsonlMetricsSink(path) as sink:
        for step in range(1, 6):
            sink.log(step, {"loss": 1.0 / step})
    with JsonlMetricsSink(path, resume_step=3) as sink:
        assert sink.dropped == 2
        sink.log(4, {"loss": 0.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert read_metrics(path)[-1]["loss"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("block", [65536, 5])
def test_truncated_last_line_is_dropped_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(jsonl_module, "_BLOCK", block)  # 5 bytes: the backwards scan crosses blocks
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # readers skip it too
    with JsonlMetricsSink(path) as sink:
        assert sink.repaired
        sink.log(3, {"loss": 0.8})
    assert [r["step"] for r in strict_lines(path)] == [1, 2, 3]


def test_truncated_only_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lo')
    with JsonlMetricsSink(path) as sink:
        assert sink.repaired
    assert path.read_text() == ""


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}')
    with JsonlMetricsSink(path) as sink:
        assert not sink.repaired
        sink.log(2, {"loss": 0.5})
    assert [r["step"] for r in strict_lines(path)] == [1, 2]


def test_corrupt_middle_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        JsonlMetricsSink(path, resume_step=1)


def test_invalid_metrics_are_rejected(tmp_path: Path) -> None:
    sink = JsonlMetricsSink(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="'step'"):
        sink.log(1, {"step": 1.0})
    with pytest.raises(ValueError, match="scalar"):
        sink.log(1, {"loss": torch.ones(2)})
    with pytest.raises(ValueError, match="number"):
        sink.log(1, {"loss": [1.0]})
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.log(1, {"loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorboard_module, "_tensorboard_available", lambda: False)
    with pytest.raises(ImportError, match=r"dfm\[tracking\]"):
        TensorBoardMetricsSink(tmp_path / "tb")


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    sink = TensorBoardMetricsSink(tmp_path / "tb")
    assert isinstance(sink, MetricsSink)
    sink.log(1, {"loss": torch.tensor(0.5), "note": "skipped"})
    sink.close()
    sink.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_in_memory_metrics_sink_records() -> None:
    sink = InMemoryMetricsSink()
    metrics = {"loss": torch.tensor(0.5), "lr": 0.1}
    sink.log(1, metrics)
    metrics["lr"] = 99.0  # the sink keeps a copy
    sink.log(2, {"loss": 0.25})
    assert sink.records == [(1, {"loss": 0.5, "lr": 0.1}), (2, {"loss": 0.25})]
    assert sink.series("loss") == [(1, 0.5), (2, 0.25)] and sink.series("lr") == [(1, 0.1)]
    sink.close()
    assert sink.closed
    with pytest.raises(ValueError, match="closed"):
        sink.log(3, {})


def test_in_memory_video_writer_keeps_frames_by_path() -> None:
    writer = InMemoryVideoWriter()
    frames = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    path = writer.write(frames, Path("samples/a.mp4"), fps=8)
    frames += 1  # the writer keeps a copy
    assert path == Path("samples/a.mp4")
    assert torch.equal(writer.videos[path], torch.zeros(2, 4, 4, 3, dtype=torch.uint8))
    assert writer.fps[path] == 8
    with pytest.raises(ValueError, match="uint8"):
        writer.write(torch.zeros(2, 4, 4, 3), Path("b.mp4"), fps=8)


def test_only_the_main_rank_writes_metrics_jsonl(tmp_path: Path) -> None:
    import attrs

    from dfm.adapters.tracking import NullMetricsSink
    from dfm.app import bootstrap
    from dfm.app.recipes.registry import get_recipe

    cfg = get_recipe("wan_tiny_t2v")
    cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, dir=str(tmp_path)))
    other = bootstrap.build_metrics_sink(cfg, resume_step=None, is_main=False)
    assert isinstance(other, NullMetricsSink)
    other.log(1, {"loss": 1.0})
    other.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    main = bootstrap.build_metrics_sink(cfg, resume_step=None)
    main.log(1, {"loss": 1.0})
    main.close()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0]
