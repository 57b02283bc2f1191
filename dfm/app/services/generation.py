"""The generation service: checkpoint + prompts -> mp4 videos and a PNG contact sheet.

```python
from dfm.app.services.generation import GenerateRequest, generate
paths = generate(GenerateRequest(checkpoint="runs/demo", prompts=["a red circle moving left slowly"], out="out.mp4"))
```
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import torch
from tqdm import tqdm

from dfm.app import bootstrap
from dfm.app.bootstrap import (
    DistEnv,
    Mp4Writer,
    SamplingLayout,
    SamplingRanks,
    choose_layout,
    contact_sheet,
    read_meta,
    sampling_ranks,
    save_png,
    to_uint8_frames,
    use_local_device,
)
from dfm.app.config import ConfigError, TrainConfig, config_from_yaml
from dfm.app.logging import get_logger
from dfm.app.services.checkpoints import EXPORTED_CONFIG, is_exported_dir, load_for_inference
from dfm.app.services.generation_request import (
    GenerateRequest,
    SamplingPlan,
    cfg_mode,
    check_image,
    check_process,
    output_paths,
    sampling_plan,
    with_codecs,
)
from dfm.app.services.lora import LoraFile, apply_loras
from dfm.app.services.paths import check_output_file
from dfm.domain.diffusion.image_condition import ImageConditioned, condition_channels, condition_pixels, frame_mask
from dfm.domain.networks.step_cache import StepCache, step_caching
from dfm.domain.sampling import sample_latents
from dfm.domain.specs import LatentSpec
from dfm.ports.checkpoint import CheckpointError
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder
from dfm.ports.tracking import VideoWriter

log = get_logger("dfm.generate")


@attrs.define
class GenerationTimings:
    """Where a generation's seconds went (``generate(..., timings=...)``; ``python -m dfm.app.bench generate``).

    Accelerator work is synchronised before each reading, so the figures are wall time of finished work.
    """

    load_s: float = 0.0
    """Reading the checkpoint into the network."""
    text_encode_s: float = 0.0
    """Encoding the prompts (and the negative prompt)."""
    step_s: list[float] = attrs.field(factory=list)
    """Each sampling step (every batch of prompts in turn; the first includes compilation)."""
    decode_s: float = 0.0
    """Decoding every video's latents to pixels."""


def inference_dtype(precision: str) -> torch.dtype:
    """The weights' dtype for ``--precision``: ``auto`` is bf16 where CUDA runs the network, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_cfg_mode(request: GenerateRequest, layout: SamplingLayout) -> None:
    """Refuse ``--cfg separate`` where guidance's passes must travel as one batch: split over ranks (CFG
    parallelism) or under a step cache (one state per row of a forward).

    Raises:
        ValueError: Naming the options that conflict.
    """
    if request.cfg == "separate" and layout.cfg > 1:
        raise ValueError(
            "--cfg separate runs the two passes of guidance one after the other, but CFG parallelism puts them on "
            "two ranks as one batch: use --cfg batched, or --no-cfg-parallel"
        )
    if request.cfg == "separate" and request.cache is not None:
        raise ValueError(
            "--cfg separate runs the two passes of guidance one after the other, but --cache keeps one state per "
            "row of a forward and would compare each pass with the other: use --cfg batched (or auto) with --cache"
        )


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place on CUDA (compiled once, reused by every step and prompt;
    the parameter names do not change). On the CPU it logs that ``--compile`` is ignored."""
    if next(model.parameters()).device.type != "cuda":
        log.warning("--compile ignored: compiling the blocks is for CUDA devices")
        return
    for block in getattr(model, "blocks", ()):
        block.compile()


def _synced(device: torch.device) -> float:
    """``time.perf_counter()`` after the device finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _StepClock:
    """The samplers' step callback: advances the progress bar and, with ``timings``, records each step's seconds."""

    def __init__(self, bar: tqdm, device: torch.device, timings: GenerationTimings | None) -> None:
        self.bar, self.device, self.timings = bar, device, timings
        self.last = _synced(device) if timings is not None else 0.0

    def __call__(self, step: int, total: int, x: torch.Tensor) -> None:
        self.bar.update(1)
        if self.timings is not None:
            now = _synced(self.device)
            self.timings.step_s.append(now - self.last)
            self.last = now


@contextlib.contextmanager
def _clear_oom(request: GenerateRequest, plan: SamplingPlan, *, decoding: bool = False) -> Iterator[None]:
    """Turns running out of accelerator memory into a ``ValueError`` that says what to change."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        size = f"{plan.frames}x{plan.height}x{plan.width}"
        if decoding:
            advice = "decode with --vae-tiling, or lower --frames, --height or --width"
        else:
            advice = (
                "lower --frames, --height or --width, use --precision bf16, --batch-size 1, --cfg separate, or launch "
                "with torchrun to split each video over GPUs (context parallel)"
            )
        what = "decoding" if decoding else "sampling"
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        raise ValueError(f"out of accelerator memory while {what} {size} videos ({first}): {advice}") from None


def generate(
    request: GenerateRequest, *, writer: VideoWriter | None = None, timings: GenerationTimings | None = None
) -> list[Path]:
    """Generate one video per prompt; returns the mp4 paths (the contact sheet is ``out`` with ``.png``).

    Mistakes are found before the weights load: the output paths must be writable, and the request must fit
    the checkpoint's recorded config and codecs (sampler, ``shift``, the video size; see :func:`sampling_plan`).
    The network is loaded alone, in the request's precision, and sampled with :func:`run_generation`.

    Under ``torchrun`` every rank calls it with the same request: the ranks share each forward in the layout of
    :func:`parallel_layout`, sample the same noise and reach the same latents; rank 0 decodes and writes them
    (and returns the paths), the other ranks write nothing and return ``[]``.

    Raises:
        ValueError: A request that does not fit the checkpoint, an unwritable ``out``, missing codecs, a parallel
            layout the processes launched or the model cannot take, or too little accelerator memory (naming
            what to change).
        CheckpointError: No checkpoint at ``request.checkpoint``, or one that fails verification.
    """
    for path in (*output_paths(request.out, len(request.prompts)), request.out.with_suffix(".png")):
        check_output_file(path, option="--out")
    recorded = recorded_config(request.checkpoint)
    codecs = None
    if recorded is not None:  # check the request against the recorded config before the weights load
        recorded = with_codecs(recorded, request)
        check_process(request, recorded)
        check_image(request, recorded)
        codecs = generation_codecs(recorded, request)
        plan = sampling_plan(request, recorded, codecs[0].latent_spec)
        check_cfg_mode(request, parallel_layout(request, recorded, plan, codecs[0].latent_spec))
    use_local_device()  # under torchrun on GPUs: this rank's own GPU before the weights load
    dtype = inference_dtype(request.precision)
    t0 = time.perf_counter()
    cfg, model = load_for_inference(
        request.checkpoint, use_ema=request.use_ema, dtype=dtype, attention=request.attention
    )
    if request.loras:
        apply_loras(model, [LoraFile(path=Path(path), scale=scale) for path, scale in request.loras])
    if timings is not None:
        timings.load_s = time.perf_counter() - t0
    cfg = with_codecs(cfg, request)
    if codecs is None or cfg != recorded:  # the loaded checkpoint's own config decides (checked again)
        codecs = generation_codecs(cfg, request)
    return run_generation(request, cfg, model, codecs, writer=writer, timings=timings)


def run_generation(
    request: GenerateRequest,
    cfg: TrainConfig,
    model: torch.nn.Module,
    codecs: tuple[LatentCodec, TextEncoder],
    *,
    writer: VideoWriter | None = None,
    timings: GenerationTimings | None = None,
) -> list[Path]:
    """Sample ``request`` with a loaded ``model`` of ``cfg`` and write the videos (rank 0); the paths.

    ``generate`` calls it after loading a checkpoint; ``python -m dfm.app.bench generate`` with a network of
    random weights. ``timings`` (if given) receives the seconds of text encoding, each step and decoding.
    """
    codec = codecs[0]
    plan = sampling_plan(request, cfg, codec.latent_spec)
    check_cfg_mode(request, parallel_layout(request, cfg, plan, codec.latent_spec))
    check_image(request, cfg)
    device = next(model.parameters()).device
    if request.compile:
        compile_blocks(model)
    # image-to-video: the condition channels and image features (every rank encodes the same images)
    condition = None if request.image is None else image_conditioning(request, plan, cfg, codec, device)
    with (
        _clear_oom(request, plan),
        joined_ranks(request, cfg, model, codec.latent_spec) as (request, ranks),
        step_caching(model, request.cache, reduce=ranks.context_sum) as cache,
    ):
        # bound around the parallel model: CFG parallel splits the conditioned batch and its image features
        sampled = ranks.model if condition is None else ImageConditioned(ranks.model, *condition)
        asked = request if ranks.is_main else attrs.evolve(request, progress=False)
        latents = sample_prompts(asked, plan, cfg, sampled, codecs, device, timings)
    if not ranks.is_main:  # every rank holds the same latents: rank 0 decodes and writes
        return []
    _log_step_cache(cache)
    t0 = time.perf_counter()
    with _clear_oom(request, plan, decoding=True):
        videos = decode_videos(codec, latents)
    if timings is not None:
        timings.decode_s = _synced(device) - t0
    paths, sheet = write_videos(request, plan, videos, writer)
    log.info("generated", videos=[str(p) for p in paths], contact_sheet=str(sheet))
    return paths


@contextlib.contextmanager
def joined_ranks(
    request: GenerateRequest, cfg: TrainConfig, model: torch.nn.Module, latent: LatentSpec
) -> Iterator[tuple[GenerateRequest, SamplingRanks]]:
    """The ranks ``torchrun`` launched joined in :func:`parallel_layout`'s layout around ``model`` (one process:
    the model as it is), and ``request`` with its ``--cfg auto`` resolved for that layout.

    Raises:
        ValueError: A layout the processes, the guidance or the model cannot take, or ``--cfg separate`` under
            CFG parallelism.
    """
    layout = parallel_layout(request, cfg, sampling_plan(request, cfg, latent), latent)
    check_cfg_mode(request, layout)
    request = attrs.evolve(request, cfg=cfg_mode(request, layout.cfg))
    backend = request.attention or cfg.train.attention_backend
    with sampling_ranks(model, layout, attention_backend=backend) as ranks:
        yield request, ranks


def image_conditioning(
    request: GenerateRequest, plan: SamplingPlan, cfg: TrainConfig, codec: LatentCodec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition channels ``[1, 4 + C, F, h, w]`` and CLIP features of ``--image`` (and ``--last-image``),
    as ``WanImageToVideoPipeline`` builds them (:mod:`dfm.domain.diffusion.image_condition`).

    Raises:
        ValueError: An unreadable image, or no image encoder (``codecs.image_encoder`` / ``--image-encoder``).
    """
    encoder = bootstrap.build_image_encoder(cfg)
    if encoder is None:
        raise ValueError(
            f"{request.checkpoint} records no codecs.image_encoder: pass --image-encoder DIR (the CLIP vision "
            "model, e.g. the image_encoder/ of Wan2.1-I2V-14B-480P-Diffusers)"
        )
    paths = [p for p in (request.image, request.last_image) if p is not None]
    frames = [bootstrap.load_image(p, plan.height, plan.width) for p in paths]
    return frame_conditioning(frames, plan, codec, encoder, device)


def frame_conditioning(
    frames: Sequence[torch.Tensor], plan: SamplingPlan, codec: LatentCodec, encoder: ImageEncoder, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition channels ``[1, 4 + C, F, h, w]`` and image features of a first frame (and a last one), each
    uint8 ``[plan.height, plan.width, 3]``: what :func:`image_conditioning` makes of the images it reads.

    Raises:
        ValueError: No frame, more than two, or frames of another size than the plan's.
    """
    size = (plan.height, plan.width, 3)
    if not 1 <= len(frames) <= 2 or any(tuple(f.shape) != size or f.dtype != torch.uint8 for f in frames):
        shapes = [(tuple(f.shape), str(f.dtype)) for f in frames]
        raise ValueError(f"image conditioning takes one or two uint8 frames of shape {size}, got {shapes}")
    pixels = [f.permute(2, 0, 1)[None].float() / 255 * 2 - 1 for f in frames]  # [1, 3, H, W] in [-1, 1]
    latents = codec.encode(condition_pixels(pixels[0], plan.frames, pixels[1] if len(pixels) > 1 else None))
    stride = codec.latent_spec.temporal_stride
    mask = frame_mask(1, plan.frames, tuple(latents.shape[-2:]), stride, last=len(pixels) > 1)
    return condition_channels(mask, latents).to(device), encoder.encode(list(frames)).to(device)


def decode_videos(codec: LatentCodec, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each ``[1, C, F, H, W]`` latent decoded to uint8 frames ``[T, H, W, 3]`` on the CPU."""
    return [to_uint8_frames(codec.decode(x.float())[0].cpu()) for x in latents]


def write_videos(
    request: GenerateRequest, plan: SamplingPlan, videos: Sequence[torch.Tensor], writer: VideoWriter | None
) -> tuple[list[Path], Path]:
    """The mp4s (``request.out``, or ``out_NN.mp4`` for several prompts) and the captioned contact sheet (``.png``)."""
    paths = output_paths(request.out, len(request.prompts))
    writer = writer or Mp4Writer()
    paths = [writer.write(v, p, plan.fps) for v, p in zip(videos, paths, strict=True)]
    sheet = save_png(contact_sheet(list(videos), captions=list(request.prompts)), request.out.with_suffix(".png"))
    return paths, sheet


def _log_step_cache(cache: StepCache | None) -> None:
    """One line per video: the network calls, and how many reused the cache (all rows, and rows of any call)."""
    if cache is None:
        return
    for i, s in enumerate(cache.videos):
        log.info(
            "step cache",
            video=i,
            method=cache.config.method,
            threshold=cache.config.threshold,
            calls=s.calls,
            calls_reused=s.skipped_calls,
            rows_reused=f"{s.reused}/{s.rows}",
        )


def recorded_config(where: Path) -> TrainConfig | None:
    """The training config recorded with the checkpoint ``where`` names, read without loading its weights.

    ``None`` when it cannot be read here (a missing or broken checkpoint): loading it then says what is wrong.
    """
    try:
        if is_exported_dir(where):
            path = where / EXPORTED_CONFIG
            return config_from_yaml(path.read_text(), source=str(path)) if path.is_file() else None
        root = where / "checkpoints" if (where / "checkpoints").is_dir() else where
        return config_from_yaml(read_meta(root)["config"], source=f"{where} meta.json")
    except (CheckpointError, ConfigError, OSError, KeyError, TypeError):
        return None


def generation_codecs(cfg: TrainConfig, request: GenerateRequest) -> tuple[LatentCodec, TextEncoder]:
    """The VAE and text encoder ``cfg`` records (or the request names): both needed, with the error to fix it."""
    checkpoint = request.checkpoint
    try:
        codec, text_encoder = bootstrap.build_codecs(cfg, vae_tiling=request.vae_tiling)
    except ConfigError as exc:
        hint = "--vae / --text-encoder / --tokenizer replace the codecs recorded in the checkpoint"
        raise ValueError(f"{exc} ({hint})") from None
    source = cfg.data.source
    if codec is None:
        raise ValueError(
            f"{checkpoint} was trained on {source} latents (data.source={source}) and its config sets no codecs.vae: "
            "there is no codec to decode videos; pass --vae DIR (the WAN VAE the latents were made with)"
        )
    if text_encoder is None:
        raise ValueError(
            f"{checkpoint} was trained on prepared text embeddings (data.source={source}) and its config sets no "
            "codecs.text_encoder: pass --text-encoder DIR (the UMT5 the captions were embedded with)"
        )
    log.info(
        "codecs",
        vae=getattr(codec, "identity", type(codec).__name__),
        text_encoder=getattr(text_encoder, "identity", type(text_encoder).__name__),
    )
    return codec, text_encoder


@torch.no_grad()
def sample_prompts(
    request: GenerateRequest,
    plan: SamplingPlan,
    cfg: TrainConfig,
    model: torch.nn.Module,
    codecs: tuple[LatentCodec, TextEncoder],
    device: torch.device,
    timings: GenerationTimings | None = None,
) -> list[torch.Tensor]:
    """The latents ``[1, C, F, H, W]`` of each prompt, sampled ``request.batch_size`` prompts per forward.

    Prompt ``i`` starts from the noise of ``seed + i`` whatever the batching, so a video does not depend on the
    prompts sampled with it (up to float rounding).
    """
    codec, text_encoder = codecs
    shape = codec.latent_spec.latent_shape(plan.frames, plan.height, plan.width)
    null = _embed(text_encoder, [request.negative_prompt], cfg, device, timings) if request.negative_prompt else None
    out: list[torch.Tensor] = []
    prompts = list(request.prompts)
    for first in range(0, len(prompts), request.batch_size):
        batch = prompts[first : first + request.batch_size]
        generators = [torch.Generator().manual_seed(request.seed + first + i) for i in range(len(batch))]
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)
        text, mask = _embed(text_encoder, batch, cfg, device, timings)
        desc = (
            f"sampling {first + 1}-{first + len(batch)}/{len(prompts)}"
            if len(batch) > 1
            else f"sampling {first + 1}/{len(prompts)}"
        )
        with tqdm(total=plan.steps, desc=desc, disable=not request.progress) as bar:
            step_clock = _StepClock(bar, device, timings)
            latents = sample_latents(
                model,
                cfg.diffusion,
                noise,
                sampler=plan.sampler,
                steps=plan.steps,
                guidance=plan.guidance,
                text=text,
                text_mask=mask,
                null_text=None if null is None else null[0],
                null_text_mask=None if null is None else null[1],
                shift=plan.shift,
                generator=generators if len(generators) > 1 else generators[0],
                callback=step_clock,
                cfg_batched=cfg_mode(request) == "batched",
            )
        out.extend(latents.split(1))
    return out


def _embed(
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    cfg: TrainConfig,
    device: torch.device,
    timings: GenerationTimings | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    t0 = time.perf_counter()
    emb, mask = text_encoder.encode(list(prompts), cfg.data.text_len)
    if timings is not None:
        timings.text_encode_s += time.perf_counter() - t0
    return emb.to(device), mask.to(device)


def parallel_layout(
    request: GenerateRequest, cfg: TrainConfig, plan: SamplingPlan, latent: LatentSpec
) -> SamplingLayout:
    """How the processes ``torchrun`` launched share each forward (one process: no parallelism).

    See :func:`dfm.adapters.torch_dist.parallel_sampling.choose_layout`: CFG parallel first when guidance runs
    both passes and the process count is even, the rest context parallel over the video tokens.

    Raises:
        ValueError: A layout the processes, the guidance or the model cannot take (naming the options).
    """
    return choose_layout(
        DistEnv.from_env().world_size,
        guidance=plan.guidance,
        spec=cfg.model,
        latent_shape=latent.latent_shape(plan.frames, plan.height, plan.width),
        cfg_parallel=request.cfg_parallel,
        context=request.context_parallel,
    )


def config_of(checkpoint_meta: dict) -> TrainConfig:
    """The resolved training config stored in a checkpoint's meta."""
    return config_from_yaml(checkpoint_meta["config"], source="checkpoint meta.json")
