"""Sample videos while training (``sample.every_n_steps``): files at those steps and at the end, EMA weights,
the same videos ``generate`` makes from the checkpoint, and losses bit-identical to a run without samples; for
text-to-video and image-to-video (``wan_tiny_i2v``: each prompt from its first frame, as ``generate --image``)."""

from __future__ import annotations

from pathlib import Path

import attrs
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from dfm.adapters.tracking import read_metrics
from dfm.app.bootstrap import build_codecs
from dfm.app.config import ConfigError, TrainConfig, resolve_config
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.generation_request import SamplingPlan, sampling_plan
from dfm.app.services.samples import training_images, training_prompts
from dfm.app.services.training import train

COMMON = ["train.max_steps=5", "train.ema_decay=0.9", "checkpoint.interval=100", "logging.level=WARNING"]
SAMPLES = ["sample.every_n_steps=2", "sample.steps=3", "sample.seed=5"]


def _rows(run: Path) -> list[tuple[float, float]]:
    return [(row["loss"], row["grad_norm"]) for row in read_metrics(run / "metrics.jsonl")]


def _with_and_without_samples(root: Path, recipe: str) -> dict[str, Path]:
    """Two runs of ``recipe`` on the same settings, one sampling every 2 steps, one never."""
    out = {"with": root / "with", "without": root / "without"}
    train(resolve_config(recipe, None, [f"run.dir={out['with']}", *COMMON, *SAMPLES]))
    train(resolve_config(recipe, None, [f"run.dir={out['without']}", *COMMON]))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _with_and_without_samples(tmp_path_factory.mktemp("samples"), "wan_tiny_t2v")


@pytest.fixture(scope="module")
def i2v_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _with_and_without_samples(tmp_path_factory.mktemp("i2v_samples"), "wan_tiny_i2v")


def _plan(cfg: TrainConfig) -> SamplingPlan:
    codec, _ = build_codecs(cfg)
    assert codec is not None
    return sampling_plan(GenerateRequest(checkpoint=".", prompts=["x"], out="x.mp4"), cfg, codec.latent_spec)


def _first_frames(tmp_path: Path) -> list[Path]:
    """The default prompts' synthetic first frames, as the PNG files ``generate --image`` takes."""
    cfg = resolve_config("wan_tiny_i2v", None, [])
    frames = training_images(cfg, _plan(cfg))
    assert frames is not None
    paths = [tmp_path / f"first_{i}.png" for i in range(len(frames))]
    for frame, path in zip(frames, paths, strict=True):
        Image.fromarray(frame.numpy()).save(path)
    return paths


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


def test_image_to_video_samples_leave_the_training_bit_identical(i2v_runs: dict[str, Path]) -> None:
    assert len(_rows(i2v_runs["with"])) == 5 and _rows(i2v_runs["with"]) == _rows(i2v_runs["without"])
    samples = i2v_runs["with"] / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]
    assert len(list(samples.glob("step_0000005_*.mp4"))) == 3


def test_image_to_video_samples_are_what_generate_image_makes(i2v_runs: dict[str, Path], tmp_path: Path) -> None:
    """Each prompt from its synthetic clip's first frame (saved as a PNG for ``--image``), seed ``5 + i``."""
    cfg = resolve_config("wan_tiny_i2v", None, [*COMMON, *SAMPLES])
    for i, (prompt, image) in enumerate(zip(training_prompts(cfg), _first_frames(tmp_path), strict=True)):
        out = tmp_path / f"gen_{i}.mp4"
        request = GenerateRequest(
            checkpoint=i2v_runs["with"], prompts=[prompt], image=image, out=out, steps=3, seed=5 + i
        )
        generate(attrs.evolve(request, progress=False))
        mine = iio.imread(i2v_runs["with"] / "samples" / f"step_0000005_{i:02d}.mp4").astype(np.int16)
        theirs = iio.imread(out).astype(np.int16)
        assert mine.shape == theirs.shape and np.abs(mine - theirs).max() <= 1, i


def test_sample_images_are_read_as_generate_reads_them(tmp_path: Path) -> None:
    """One file per prompt, or one for every prompt: the synthetic first frames saved and read back are the same."""
    paths = _first_frames(tmp_path)
    synthetic = training_images(
        resolve_config("wan_tiny_i2v", None, []), _plan(resolve_config("wan_tiny_i2v", None, []))
    )
    for images, expected in ((paths, synthetic), ([paths[1]], [synthetic[1]] * 3)):
        cfg = resolve_config("wan_tiny_i2v", None, [f"sample.images=[{','.join(map(str, images))}]"])
        frames = training_images(cfg, _plan(cfg))
        assert len(frames) == 3 and all(torch.equal(a, b) for a, b in zip(frames, expected, strict=True))


def test_what_sample_images_refuse(tmp_path: Path) -> None:
    image = _first_frames(tmp_path)[0]
    run = [f"run.dir={tmp_path / 'run'}", "sample.every_n_steps=1", "train.max_steps=1", "logging.level=WARNING"]
    with pytest.raises(ConfigError, match=r"sample\.images: first frames of image-to-video samples, but this model is"):
        resolve_config("wan_tiny_t2v", None, [f"sample.images=[{image}]"])
    with pytest.raises(ConfigError, match=r"sample\.images: 2 images for 3 prompts"):
        resolve_config("wan_tiny_i2v", None, ["sample.prompts=[a,b,c]", f"sample.images=[{image},{image}]"])
    with pytest.raises(ConfigError, match=r"sample\.images: 2 images for 3 prompts"):  # the synthetic prompts
        train(resolve_config("wan_tiny_i2v", None, [*run, f"sample.images=[{image},{image}]"]))
    with pytest.raises(ConfigError, match=r"sample\.images: .*nowhere\.png does not exist"):
        train(resolve_config("wan_tiny_i2v", None, [*run, f"sample.images=[{tmp_path / 'nowhere.png'}]"]))
    with pytest.raises(ConfigError, match=r"sample\.images: an image-to-video model samples from a first frame"):
        train(resolve_config("wan_tiny_i2v", None, [*run, "sample.prompts=[a red circle moving left slowly]"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training
