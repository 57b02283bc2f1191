"""Sample videos while a run trains (``sample.every_n_steps``): what ``generate`` does, with the live network.

At every ``sample.every_n_steps``-th step and at the end, every rank enters the runtime's
:meth:`~dfm.ports.runtime.ParallelRuntime.sampling_model` (the EMA's weights when kept; a sharded network samples
with all its ranks, as its forward needs), samples ``sample.prompts`` with the run's ``sample.*`` settings from the
noise of ``sample.seed + i``, and rank 0 decodes and writes ``<run.dir>/samples/step_XXXXXXX.mp4`` (``_NN`` for
several prompts) with a captioned contact sheet ``step_XXXXXXX.png``. An image-to-video model samples each prompt
from its first frame (``sample.images``, or the first frames of the synthetic clips the default prompts describe),
conditioned as ``generate --image`` conditions it, one prompt at a time. The noise comes from its own generators and
the network runs without gradients in eval mode, so the training RNG streams, weights and optimizer state are
untouched: a run with samples has the same losses, bit for bit, as one without.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import attrs
import torch

from dfm.app import bootstrap
from dfm.app.config import ConfigError, TrainConfig
from dfm.app.logging import get_logger
from dfm.app.services.generation import decode_videos, frame_conditioning, sample_prompts, write_videos
from dfm.app.services.generation_request import GenerateRequest, SamplingPlan, sampling_plan
from dfm.domain.diffusion.image_condition import ImageConditioned
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder
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
    return tuple(_synthetic_clip(cfg, i).caption for i in range(SYNTHETIC_PROMPTS))


def _synthetic_clip(cfg: TrainConfig, index: int) -> bootstrap.VideoSpec:
    s = cfg.data.synthetic
    return bootstrap.describe_clip(index, cfg.seed, background=s.background, placement=s.placement, radius=s.radius)


def _is_i2v(cfg: TrainConfig) -> bool:
    return bool(getattr(cfg.model, "image_to_video", False))


def training_images(cfg: TrainConfig, plan: SamplingPlan) -> list[torch.Tensor] | None:
    """The first frame of each prompt's sample, uint8 ``[plan.height, plan.width, 3]``; ``None`` for text-to-video.

    ``sample.images`` read as ``generate --image`` reads them (one for every prompt, or one per prompt), else the
    first frames of the ``synthetic`` clips whose captions :func:`training_prompts` takes.

    Raises:
        ValueError: An unreadable image.
    """
    if not _is_i2v(cfg):
        return None
    count = len(training_prompts(cfg))
    if cfg.sample.images:
        frames = [bootstrap.load_image(path, plan.height, plan.width) for path in cfg.sample.images]
        return frames * count if len(frames) == 1 else frames
    return [bootstrap.first_clip_frame(_synthetic_clip(cfg, i), plan.height, plan.width) for i in range(count)]


def _check_images(cfg: TrainConfig) -> None:
    """``sample.images`` against an image-to-video model: given where needed, as many as the prompts, on disk."""
    if not _is_i2v(cfg):
        return  # a text-to-video config with sample.images does not resolve
    if getattr(cfg.model, "pos_embed_seq_len", None) is not None:
        raise ConfigError(
            "sample.every_n_steps: first-last-frame models (model.pos_embed_seq_len set) are not sampled during "
            "training yet; sample their checkpoints with generate --image --last-image"
        )
    images, prompts = cfg.sample.images, training_prompts(cfg)
    if not images:
        if cfg.data.source != "synthetic" or cfg.sample.prompts:
            raise ConfigError(
                "sample.images: an image-to-video model samples from a first frame: give one image file per prompt "
                "(or one for all), e.g. sample.images='[first.png]' (only synthetic data without sample.prompts "
                "take their clips' first frames)"
            )
        return
    if len(images) not in (1, len(prompts)):
        raise ConfigError(
            f"sample.images: {len(images)} images for {len(prompts)} prompts: give one image per prompt, or one for "
            "all of them"
        )
    missing = [path for path in images if not Path(path).is_file()]
    if missing:
        raise ConfigError(f"sample.images: {', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist")
    if cfg.codecs.image_encoder is None and cfg.data.source != "synthetic":
        raise ConfigError(
            "codecs.image_encoder: sampling an image-to-video model during training encodes its first frames: set "
            "codecs.image_encoder to the CLIP vision model the data were prepared with (or unset "
            "sample.every_n_steps)"
        )


def check_training_samples(cfg: TrainConfig, codec: LatentCodec | None, text: TextEncoder | None) -> None:
    """Raise ``ConfigError`` when ``sample.every_n_steps`` cannot work with this run's codecs, data or layout."""
    if cfg.sample.every_n_steps is None:
        return
    training_prompts(cfg)
    _check_images(cfg)
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
    plan = sampling_plan(_request(cfg, 0), cfg, codec.latent_spec)  # sizes that the codec and the model take
    try:
        training_images(cfg, plan)
    except ValueError as exc:
        raise ConfigError(f"sample.images: {exc}") from None


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
    *,
    image_encoder: ImageEncoder | None = None,
) -> list[Path]:
    """Sample the run's prompts with the network as trained up to ``step``; rank 0 writes them (others: ``[]``).

    An image-to-video model's prompts are sampled one at a time, each with its first frame's condition
    (:func:`training_images`; ``image_encoder`` encodes them, by default the one ``codecs.image_encoder`` names).

    Collective: every rank of the runtime calls it at the same step.
    """
    request = _request(cfg, step)
    plan = sampling_plan(request, cfg, codecs[0].latent_spec)
    device = torch.device(runtime.topology.device)
    frames = training_images(cfg, plan)
    with runtime.sampling_model(use_ema=True) as model, _autocast(cfg, device):
        if frames is None:
            latents = sample_prompts(request, plan, cfg, model, codecs, device)
        else:
            encoder = image_encoder or bootstrap.build_image_encoder(cfg)
            assert encoder is not None, "check_training_samples refuses image-to-video runs without an image encoder"
            latents = []
            for i, (prompt, frame) in enumerate(zip(request.prompts, frames, strict=True)):
                conditioned = ImageConditioned(model, *frame_conditioning([frame], plan, codecs[0], encoder, device))
                one = attrs.evolve(request, prompts=(prompt,), seed=request.seed + i)
                latents += sample_prompts(one, plan, cfg, conditioned, codecs, device)
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
