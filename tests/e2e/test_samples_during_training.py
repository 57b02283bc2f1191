"""Sample videos while training (``sample.every_n_steps``): files at those steps and at the end, EMA weights,
the same videos ``generate`` makes from the checkpoint, and losses bit-identical to a run without samples."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from dfm.adapters.tracking import read_metrics
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.samples import training_prompts
from dfm.app.services.training import train

COMMON = ["train.max_steps=5", "train.ema_decay=0.9", "checkpoint.interval=100", "logging.level=WARNING"]
SAMPLES = ["sample.every_n_steps=2", "sample.steps=3", "sample.seed=5"]


def _rows(run: Path) -> list[tuple[float, float]]:
    return [(row["loss"], row["grad_norm"]) for row in read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("samples")
    out = {"with": root / "with", "without": root / "without"}
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={out['with']}", *COMMON, *SAMPLES]))
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={out['without']}", *COMMON]))
    return out


def test_samples_leave_the_training_bit_identical(runs: dict[str, Path]) -> None:
    assert len(_rows(runs["with"])) == 5 and _rows(runs["with"]) == _rows(runs["without"])


def test_samples_are_written_at_the_interval_and_at_the_end(runs: dict[str, Path]) -> None:
    samples = runs["with"] / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]
    assert len(list(samples.glob("step_0000005_*.mp4"))) == 3  # the synthetic data's first three captions
    assert not (runs["without"] / "samples").exists()


def test_the_last_samples_are_what_generate_makes_from_the_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    """EMA weights, the run's sample settings and seed: the contact sheets agree pixel for pixel (within 1)."""
    cfg = resolve_config("wan_tiny_t2v", None, [*COMMON, *SAMPLES])
    out = tmp_path / "gen.mp4"
    generate(GenerateRequest(checkpoint=runs["with"], prompts=training_prompts(cfg), out=out, steps=3, seed=5))
    mine = iio.imread(runs["with"] / "samples" / "step_0000005.png").astype(np.int16)
    theirs = iio.imread(out.with_suffix(".png")).astype(np.int16)
    assert mine.shape == theirs.shape and np.abs(mine - theirs).max() <= 1


def test_samples_need_prompts_and_codecs(tmp_path: Path) -> None:
    overrides = [f"run.dir={tmp_path / 'mock'}", "data.source=mock", "sample.every_n_steps=1", "train.max_steps=1"]
    with pytest.raises(
        ConfigError, match=r"sample.prompts: sample.every_n_steps=1 needs prompts with data.source=mock"
    ):
        train(resolve_config("wan_tiny_t2v", None, overrides))
    with pytest.raises(ConfigError, match=r"sampling needs the codecs that made them: set codecs\.vae"):
        train(resolve_config("wan_tiny_t2v", None, [*overrides, "sample.prompts=[a red circle]"]))
