"""Progress and pictures while training: the terminal's progress bar and ``python -m dfm.app.plot``."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from dfm.adapters.tracking import curves, read_metrics
from dfm.app.config import resolve_config
from dfm.app.services.training import train

REPO = Path(__file__).resolve().parents[2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar_and_a_pipe_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ["train.max_steps=3", "checkpoint.interval=100", "logging.level=WARNING"]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={tmp_path / 'tty'}", *overrides]))
    shown = terminal.getvalue()
    last = read_metrics(tmp_path / "tty" / "metrics.jsonl")[-1]
    assert "train:" in shown and "3/3" in shown and f"loss={last['loss']:.4f}" in shown
    pipe = io.StringIO()  # not a terminal: no bar
    monkeypatch.setattr(sys, "stderr", pipe)
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={tmp_path / 'pipe'}", *overrides]))
    assert "train:" not in pipe.getvalue()


def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_follow_the_steps_and_leave_gaps() -> None:
    rows = [
        {"step": 2, "loss": 0.5, "grad_norm": 1.0, "lr": 1e-3, "samples_per_s": 4.0},
        {"step": 1, "loss": 0.9, "grad_norm": 2.0, "lr": 5e-4, "samples_per_s": 3.0},
        {"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3},  # a skipped step
    ]
    got = curves(rows)
    assert got["loss"] == ([1, 2], [0.9, 0.5]) and got["gradient norm"] == ([1, 2], [2.0, 1.0])
    assert got["learning rate"] == ([1, 2, 3], [5e-4, 1e-3, 1e-3]) and got["samples/s"] == ([1, 2], [3.0, 4.0])
    with_tflops = curves([{**r, "model_tflops": 100.0 + r["step"]} for r in rows])
    assert "samples/s" not in with_tflops and with_tflops["model TFLOP/s per device"][1] == [101.0, 102.0, 103.0]


def test_plot_cli_writes_the_png_of_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_metrics(
        run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s, "grad_norm": 1.0, "lr": 1e-3} for s in (1, 2, 3)]
    )
    done = subprocess.run([sys.executable, "-m", "dfm.app.plot", str(run)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    png = Path(done.stdout.strip())
    assert png == run / "curves.png"
    image = iio.imread(png)
    assert image.shape[:2] == (700, 1000) and image.std() > 0  # a 10 x 7 inch figure at 100 dpi, not blank
    empty = subprocess.run(
        [sys.executable, "-m", "dfm.app.plot", str(tmp_path / "nothing")], capture_output=True, text=True, cwd=REPO
    )
    assert empty.returncode == 2
    assert empty.stderr.strip().startswith("error: ") and "metrics.jsonl does not exist" in empty.stderr
