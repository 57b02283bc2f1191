"""Sample videos while a run trains (``sample.every_n_steps``): what ``generate`` does, with the live network.

At every ``sample.every_n_steps``-th step and at the end, every rank enters the runtime's
:meth:`~dfm.ports.runtime.ParallelRuntime.sampling_model` (the EMA's weights when kept; a sharded network samples
with all its ranks, as its forward needs), samples ``sample.prompts`` with the run's ``sample.*`` settings from the
noise of ``sample.seed + i``, and rank 0 decodes and writes ``<run.dir>/samples/step_XXXXXXX.mp4`` (``_NN`` for
several prompts) with a captioned contact sheet ``step_XXXXXXX.png``. The noise comes from its own generators and
the network runs without gradients in eval mode, so the training RNG streams, weights and optimizer state are
untouched: a run with samples has the same losses, bit for bit, as one without.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dfm.app import bootstrap
from dfm.app.config import ConfigError, TrainConfig
from dfm.app.logging import get_logger
from dfm.app.services.generation import decode_videos, sample_prompts, write_videos
from dfm.app.services.generation_request import GenerateRequest, sampling_plan
from dfm.ports.codecs import LatentCodec, TextEncoder
from dfm.ports.runtime import ParallelRuntime
from dfm.ports.tracking import VideoWriter

log = get_logger("dfm.samples")
SYNTHETIC_PROMPTS = 3
"""Captions of the synthetic data sampled when ``sample.prompts`` is empty."""


def training_prompts(cfg: TrainConfig) -> tuple[str, ...]:
    """``sample.prompts``, or the first captions of the ``synthetic`` data.

    Raises:
        ConfigError: No prompts, and data that is not ``synthetic``.
    """
    if cfg.sample.prompts:
        return cfg.sample.prompts
    if cfg.data.source != "synthetic":
        raise ConfigError(
            f"sample.prompts: sample.every_n_steps={cfg.sample.every_n_steps} needs prompts with "
            f"data.source={cfg.data.source} (e.g. sample.prompts='[\"a cat surfing at sunset\"]')"
        )
    s = cfg.data.synthetic
    return tuple(
        bootstrap.describe_clip(i, cfg.seed, background=s.background, placement=s.placement, radius=s.radius).caption
        for i in range(SYNTHETIC_PROMPTS)
    )


def check_training_samples(cfg: TrainConfig, codec: LatentCodec | None, text: TextEncoder | None) -> None:
    """Raise ``ConfigError`` when ``sample.every_n_steps`` cannot work with this run's codecs, data or layout."""
    if cfg.sample.every_n_steps is None:
        return
    if getattr(cfg.model, "image_to_video", False):
        raise ConfigError(
            "sample.every_n_steps: samples during training are text-to-video only for now; sample an image-to-video "
            "run's checkpoints with generate --image"
        )
    training_prompts(cfg)
    if codec is None or text is None:
        raise ConfigError(
            f"sample.every_n_steps: data.source={cfg.data.source} trains on prepared latents and embeddings, and "
            "sampling needs the codecs that made them: set codecs.vae and codecs.text_encoder (or unset "
            "sample.every_n_steps)"
        )
    if cfg.runtime == "megatron" and cfg.parallel.pipeline > 1:
        raise ConfigError(
            "sample.every_n_steps: the megatron runtime samples only without pipeline parallelism "
            f"(parallel.pipeline={cfg.parallel.pipeline}); sample from the checkpoints instead (generate --checkpoint)"
        )
    sampling_plan(_request(cfg, 0), cfg, codec.latent_spec)  # sizes that the codec and the model take


def _request(cfg: TrainConfig, step: int) -> GenerateRequest:
    return GenerateRequest(
        checkpoint=Path(cfg.run.dir),
        prompts=training_prompts(cfg),
        out=Path(cfg.run.dir) / "samples" / f"step_{step:07d}.mp4",
        seed=cfg.sample.seed,
        progress=False,
        cfg="separate",
    )


def write_training_samples(
    cfg: TrainConfig,
    runtime: ParallelRuntime,
    codecs: tuple[LatentCodec, TextEncoder],
    step: int,
    writer: VideoWriter | None = None,
) -> list[Path]:
    """Sample the run's prompts with the network as trained up to ``step``; rank 0 writes them (others: ``[]``).

    Collective: every rank of the runtime calls it at the same step.
    """
    request = _request(cfg, step)
    plan = sampling_plan(request, cfg, codecs[0].latent_spec)
    device = torch.device(runtime.topology.device)
    with runtime.sampling_model(use_ema=True) as model, _autocast(cfg, device):
        latents = sample_prompts(request, plan, cfg, model, codecs, device)
    if not runtime.topology.is_main:
        return []
    paths, sheet = write_videos(request, plan, decode_videos(codecs[0], latents), writer)
    log.info("samples", step=step, videos=[str(p) for p in paths], contact_sheet=str(sheet))
    return paths


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where training computes in bf16 on a GPU (the network keeps its float32 weights)."""
    if device.type == "cuda" and cfg.train.precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
