"""Experiment trackers: Weights & Biases offline (scalars, sample videos, a resumed run continuing the same W&B
run) and TensorBoard, each holding what ``metrics.jsonl`` holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from support.wandb_files import history

from dfm.adapters.tracking import read_metrics
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.training import train

COMMON = ["train.log_interval=2", "checkpoint.interval=100", "logging.level=WARNING", "sample.steps=2"]


def _train(run: Path, steps: int, *extra: str) -> None:
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={run}", f"train.max_steps={steps}", *COMMON, *extra]))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run / "metrics.jsonl")}


@pytest.mark.usefixtures("offline")
def test_wandb_offline_holds_the_scalars_and_videos_and_a_resume_continues_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    wandb = ["tracking.wandb=true", "tracking.project=dfm-tests", "tracking.tags=[ci,tiny]", "sample.every_n_steps=2"]
    _train(run, 4, *wandb)
    run_id = (run / "wandb_run_id").read_text().strip()
    first = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(first) == 1
    rows = history(first[0])
    assert {row["_step"]: row["loss"] for row in rows} == _losses(run)
    assert [row["samples/count"] for row in rows] == [3, 3]  # the synthetic data's first three captions
    assert len(list(first[0].parent.glob("files/media/videos/samples_*.mp4"))) == 6
    _train(run, 6, *wandb)  # resumes the checkpoint at step 4
    assert (run / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2
    resumed = [row for path in runs for row in history(path)]
    assert {row["_step"]: row["loss"] for row in resumed} == _losses(run) and max(_losses(run)) == 6


def test_tensorboard_holds_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _train(run, 4, "tracking.tensorboard=true")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    got = {e.step: e.value for e in events.Scalars("loss")}
    assert got.keys() == _losses(run).keys()
    assert all(abs(got[s] - v) <= 1e-6 * abs(v) for s, v in _losses(run).items())  # stored as float32


def test_a_missing_tracker_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"tracking\.wandb needs the wandb package; install the tracking extra"):
        _train(tmp_path / "run", 1, "tracking.wandb=true")
