"""Training WAN image-to-video on synthetic clips conditioned on their own first frame (recipe ``wan_tiny_i2v``):
the batches carry WanImageToVideoPipeline's condition, local and fsdp2 train alike, and the model learns to use the
frame; then ``generate --image`` samples from it."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from PIL import Image

from dfm.adapters.memory import InMemoryVideoWriter
from dfm.adapters.synthetic import MockLatentSource, PatchImageEncoder, SyntheticVideoSource
from dfm.adapters.synthetic.videos import describe, render_batch
from dfm.adapters.tracking import read_metrics
from dfm.app.bench import bench_train
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.training import train
from dfm.domain.specs import forward_flops

QUIET = ["logging.level=WARNING", "checkpoint.interval=1000"]


def _uint8(video: torch.Tensor) -> torch.Tensor:
    """``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]``."""
    return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


def test_synthetic_batches_carry_the_first_frame_condition() -> None:
    source = SyntheticVideoSource(
        frames=5,
        height=16,
        width=16,
        text_len=8,
        global_batch_size=2,
        micro_batch_size=2,
        image_encoder=PatchImageEncoder(),
    )
    batch = next(iter(source))
    assert batch.condition is not None and batch.image is not None
    assert batch.condition.shape == (2, 1 + 3, 5, 16, 16)  # frame mask (temporal stride 1), condition pixels
    mask, condition = batch.condition[:, :1], batch.condition[:, 1:]
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    assert torch.equal(condition[:, :, 0], batch.latents[:, :, 0]) and condition[:, :, 1:].eq(0).all()
    first = [_uint8(clip)[0] for clip in batch.latents]
    assert torch.equal(batch.image, PatchImageEncoder().encode(first)) and batch.image.shape == (2, 16, 48)


@pytest.mark.parametrize("image_dropout", [0.0, 0.5])
def test_fsdp2_trains_image_to_video_as_local_does(tmp_path: Path, image_dropout: float) -> None:
    """With image dropout too (drawn per sample, so every runtime drops the same samples; logged as image_dropped)."""
    losses, dropped = {}, {}
    for runtime in ("local", "fsdp2"):
        run = tmp_path / runtime
        overrides = [f"run.dir={run}", f"runtime={runtime}", "train.max_steps=3", *QUIET]
        train(resolve_config("wan_tiny_i2v", None, [*overrides, f"diffusion.image_dropout={image_dropout}"]))
        rows = read_metrics(run / "metrics.jsonl")
        losses[runtime] = [row["loss"] for row in rows]
        dropped[runtime] = [row.get("image_dropped") for row in rows]
    assert len(losses["local"]) == 3
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(losses["local"], losses["fsdp2"], strict=True)), losses
    assert dropped["local"] == dropped["fsdp2"]
    if image_dropout:
        assert all(d is not None for d in dropped["local"]) and 0 < sum(dropped["local"]) < 3, dropped
    else:
        assert dropped["local"] == [None] * 3


@pytest.mark.slow
def test_a_tiny_model_learns_to_start_from_its_first_frame(tmp_path: Path) -> None:
    """300 steps: sampled from a held-out clip's first frame, the video starts at that frame (2x closer than when
    sampled from another clip's frame) and is closer to the clip as a whole."""
    run = tmp_path / "run"
    steps = ["train.max_steps=300", "train.log_interval=50", "optim.lr=3e-3", "train.ema_decay=0.99"]
    train(resolve_config("wan_tiny_i2v", None, [f"run.dir={run}", *steps, *QUIET]))
    first_error, whole_error = {"right": 0.0, "wrong": 0.0}, {"right": 0.0, "wrong": 0.0}
    for i in range(4):
        spec = describe(100_000 + i, 0)
        clip = _uint8(render_batch([spec], 5, 16, 16)[0]).float()
        other = _uint8(render_batch([describe(200_000 + i, 0)], 5, 16, 16)[0])
        for name, frame in (("right", clip[0].to(torch.uint8)), ("wrong", other[0])):
            image = tmp_path / f"{i}_{name}.png"
            Image.fromarray(frame.numpy()).save(image)
            writer = InMemoryVideoWriter()
            request = GenerateRequest(
                checkpoint=run, prompts=[spec.caption], image=image, out=tmp_path / "v.mp4", seed=i, progress=False
            )
            generate(request, writer=writer)
            video = next(iter(writer.videos.values())).float()
            first_error[name] += (video[0] - clip[0]).abs().mean().item()
            whole_error[name] += (video - clip).abs().mean().item()
    assert first_error["right"] < 0.65 * first_error["wrong"], first_error
    assert whole_error["right"] < whole_error["wrong"], whole_error


def test_what_image_to_video_training_does_not_take_yet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the megatron runtime trains text-to-video models only"):
        train(resolve_config("wan_tiny_i2v", None, [f"run.dir={tmp_path / 'm'}", "runtime=megatron", *QUIET]))


def test_mock_data_feed_an_image_to_video_benchmark() -> None:
    """``data.source=mock`` draws condition channels and image features of the model's sizes (first-last-frame: two
    images per sample), so ``bench train`` runs an I2V model; its FLOPs count the image tokens."""
    cfg = resolve_config("wan_tiny_i2v", None, ["data.source=mock", "logging.level=WARNING"])
    source = MockLatentSource(
        latent_shape=(3, 5, 16, 16),
        text_len=8,
        text_dim=32,
        global_batch_size=2,
        micro_batch_size=2,
        condition_channels=4,
        image_shape=(2, 257, 48),
    )
    batch = next(iter(source))
    assert batch.condition.shape == (2, 4, 5, 16, 16) and batch.image.shape == (4, 257, 48)
    figures = bench_train(cfg, warmup=1, steps=1)
    assert figures["timed_steps"] == 1 and figures["tokens_per_sample"] == 2  # a WAN-VAE-like 2 x 2 x 2 latent
    i2v, t2v = cfg.model, attrs.evolve(cfg.model, in_channels=3, image_dim=None, added_kv_proj_dim=None)
    assert forward_flops(i2v, 320, 8) - forward_flops(t2v, 320, 8) >= 2 * 4 * 257 * 24 * 24  # image keys/values
