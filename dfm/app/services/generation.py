"""The generation service: checkpoint + prompts -> mp4 videos and a PNG contact sheet.

```python
from dfm.app.services.generation import GenerateRequest, generate
paths = generate(GenerateRequest(checkpoint="runs/demo", prompts=["a red circle moving left slowly"], out="out.mp4"))
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import torch
from tqdm import tqdm

from dfm.adapters.checkpoint import read_meta
from dfm.adapters.torch_dist import DistEnv
from dfm.adapters.torch_dist.parallel_sampling import SamplingLayout, choose_layout, sampling_ranks, use_local_device
from dfm.adapters.video import Mp4Writer, contact_sheet, save_png, to_uint8_frames
from dfm.app import bootstrap
from dfm.app.config import CodecsConfig, ConfigError, TrainConfig, config_from_yaml
from dfm.app.config.sample import EDM_SAMPLERS, FLOW_SAMPLERS
from dfm.app.logging import get_logger
from dfm.app.services.checkpoints import EXPORTED_CONFIG, is_exported_dir, load_for_inference
from dfm.app.services.paths import check_output_file
from dfm.domain.networks.step_cache import CACHE_METHODS, StepCache, StepCacheConfig, step_caching
from dfm.domain.sampling import sample_latents
from dfm.domain.specs import LatentSpec, ModelSpec
from dfm.ports.checkpoint import CheckpointError
from dfm.ports.codecs import LatentCodec, TextEncoder
from dfm.ports.tracking import VideoWriter

log = get_logger("dfm.generate")

MAX_SEED = 2**63 - 1
"""Largest ``seed``."""


Validator = Callable[[object, "attrs.Attribute[object]", object], None]


def _int_option(option: str, low: int, high: int | None = None) -> Validator:
    """A validator refusing anything but ``None`` or an int in ``[low, high]``, naming the CLI ``option``."""

    def check(_inst: object, _attr: attrs.Attribute[object], value: object) -> None:
        if value is None:
            return
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        if not ok:
            wanted = f">= {low}" if high is None else f"from {low} to {high}"
            raise ValueError(f"{option} must be an integer {wanted}, got {value!r}")

    return check


def _number_option(option: str, *, positive: bool, note: str = "") -> Validator:
    """A validator refusing anything but ``None`` or a finite number ``> 0`` (``positive``) or ``>= 0``,
    naming the CLI ``option``; nan and inf are refused (comparisons alone would let nan through)."""

    def check(_inst: object, _attr: attrs.Attribute[object], value: object) -> None:
        if value is None:
            return
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (value > 0 if positive else value >= 0):
            shown = f"{value:g}" if isinstance(value, float) else repr(value)
            raise ValueError(f"{option} must be a finite number {'>' if positive else '>='} 0{note}, got {shown}")

    return check


def cache_option(value: object) -> StepCacheConfig | None:
    """``--cache`` as a step-cache config: ``METHOD:THRESHOLD`` (e.g. ``first_block:0.05``), ``off`` or ``None``
    (every step runs every block); a :class:`StepCacheConfig` is kept.

    Raises:
        ValueError: Any other value, naming the option and the forms it takes.
    """
    if value is None or isinstance(value, StepCacheConfig):
        return value
    text = str(value).strip()
    if text == "off":
        return None
    method, sep, threshold = text.partition(":")
    if method not in CACHE_METHODS or not sep:
        raise ValueError(
            f"--cache must be METHOD:THRESHOLD with METHOD {' or '.join(CACHE_METHODS)} (e.g. first_block:0.05), "
            f"or off; got {text!r}"
        )
    try:
        number = float(threshold)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"--cache {text}: the threshold must be a finite number >= 0 (0 = never reuse; larger = faster and "
            f"further from the uncached result), got {threshold!r}"
        )
    return StepCacheConfig(method=method, threshold=number)


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """What to generate; ``None`` fields take the values of the checkpoint's ``sample`` config."""

    checkpoint: Path = attrs.field(converter=Path)
    """A run directory (its newest checkpoint), one checkpoint directory, or a diffusers directory exported
    from a checkpoint (``python -m dfm.app.convert export --checkpoint``: weights + ``dfm_config.yaml``)."""
    prompts: tuple[str, ...] = attrs.field(converter=tuple)
    """One video per prompt."""
    out: Path = attrs.field(converter=Path)
    """Output path ``NAME.mp4``; several prompts write ``NAME_00.mp4``, ``NAME_01.mp4``..."""
    negative_prompt: str | None = None
    """Text for the unconditional pass (default: the null text used in training)."""
    sampler: str | None = None
    """``unipc`` | ``flow_euler`` | ``edm_euler`` | ``edm_heun``."""
    steps: int | None = attrs.field(default=None, validator=_int_option("--steps", 1))
    """Sampling steps."""
    guidance: float | None = attrs.field(
        default=None, validator=_number_option("--guidance", positive=False, note=" (1 = no guidance)")
    )
    """Classifier-free guidance scale (1 = no guidance, 0 = the unconditional pass only)."""
    shift: float | None = attrs.field(default=None, validator=_number_option("--shift", positive=True))
    """Flow shift at sampling time (flow-matching models only)."""
    seed: int = attrs.field(default=0, validator=_int_option("--seed", 0, MAX_SEED))
    """Seed of the initial noise (the same seed gives the same video); prompt ``i`` uses ``seed + i``."""
    frames: int | None = attrs.field(default=None, validator=_int_option("--frames", 1))
    """Frames of the video; the model's VAE stride and patch size decide which counts fit."""
    height: int | None = attrs.field(default=None, validator=_int_option("--height", 1))
    """Height in pixels; a multiple of the VAE's spatial stride times the model's patch height."""
    width: int | None = attrs.field(default=None, validator=_int_option("--width", 1))
    """Width in pixels; a multiple of the VAE's spatial stride times the model's patch width."""
    fps: float | None = attrs.field(default=None, validator=_number_option("--fps", positive=True))
    """Frame rate of the mp4 (default: the data's)."""
    use_ema: bool = True
    """Sample with the EMA weights when the checkpoint has them (an exported directory holds one set)."""
    vae: str | None = None
    """WAN VAE directory replacing the checkpoint's ``codecs.vae`` (e.g. when the recorded path moved)."""
    text_encoder: str | None = None
    """UMT5 directory replacing the checkpoint's ``codecs.text_encoder``."""
    tokenizer: str | None = None
    """Tokenizer directory replacing the checkpoint's ``codecs.tokenizer``."""
    progress: bool = True
    """Show a progress bar over sampling steps."""
    cache: StepCacheConfig | None = attrs.field(default=None, converter=cache_option)
    """Step caching (``--cache METHOD:THRESHOLD``, a string or a config): reuse the transformer blocks' residual
    at steps whose input barely changed (:mod:`dfm.domain.networks.step_cache`); ``None``: every step runs them."""
    # Multi-process generation under torchrun (see parallel_layout) -------------------------------
    cfg_parallel: bool | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool))
    )
    """Run the conditional and unconditional passes of guidance on two ranks (``None``: when guidance is on and
    the process count is even)."""
    context_parallel: int | None = attrs.field(default=None, validator=_int_option("--context-parallel", 1))
    """Ranks that split each video's tokens (``None``: the processes CFG parallelism leaves)."""

    def __attrs_post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        if self.out.suffix.lower() != ".mp4":
            raise ValueError(f"--out must name an .mp4 file, got {self.out}")


def output_paths(out: Path, n: int) -> list[Path]:
    """``out`` for one video, ``out_00.mp4``... for several."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(n)]


def generate(request: GenerateRequest, *, writer: VideoWriter | None = None) -> list[Path]:
    """Generate one video per prompt; returns the mp4 paths (the contact sheet is ``out`` with ``.png``).

    Mistakes are found before the weights load: the output paths must be writable, and the request must fit
    the checkpoint's recorded config and codecs (sampler, ``shift``, the video size; see :func:`sampling_plan`).

    Under ``torchrun`` every rank calls it with the same request: the ranks share each forward in the layout of
    :func:`parallel_layout`, sample the same noise and reach the same latents; rank 0 decodes and writes them
    (and returns the paths), the other ranks write nothing and return ``[]``.

    Raises:
        ValueError: A request that does not fit the checkpoint, an unwritable ``out``, missing codecs, a parallel
            layout the processes launched or the model cannot take.
        CheckpointError: No checkpoint at ``request.checkpoint``, or one that fails verification.
    """
    paths = output_paths(request.out, len(request.prompts))
    sheet_path = request.out.with_suffix(".png")
    for path in (*paths, sheet_path):
        check_output_file(path, option="--out")
    recorded = recorded_config(request.checkpoint)
    codecs = None
    if recorded is not None:  # check the request against the recorded config before the weights load
        recorded = with_codecs(recorded, request)
        check_process(request, recorded)
        codecs = _codecs(recorded, request.checkpoint)
        parallel_layout(
            request, recorded, sampling_plan(request, recorded, codecs[0].latent_spec), codecs[0].latent_spec
        )
    use_local_device()  # under torchrun on GPUs: this rank's own GPU before the weights load
    cfg, model = load_for_inference(request.checkpoint, use_ema=request.use_ema)
    cfg = with_codecs(cfg, request)
    if codecs is None or cfg != recorded:  # the loaded checkpoint's own config decides (checked again)
        codecs = _codecs(cfg, request.checkpoint)
    codec, text_encoder = codecs
    plan = sampling_plan(request, cfg, codec.latent_spec)
    device = next(model.parameters()).device
    layout = parallel_layout(request, cfg, plan, codec.latent_spec)
    with (
        sampling_ranks(model, layout, attention_backend=cfg.train.attention_backend) as ranks,
        step_caching(model, request.cache, reduce=ranks.context_sum) as cache,
    ):
        asked = request if ranks.is_main else attrs.evolve(request, progress=False)
        latents = [
            _one_video(asked, plan, cfg, ranks.model, codec, text_encoder, prompt, device, i)
            for i, prompt in enumerate(request.prompts)
        ]
    if not ranks.is_main:  # every rank holds the same latents: rank 0 decodes and writes
        return []
    _log_step_cache(cache)
    videos = [to_uint8_frames(codec.decode(x.float().cpu())[0]) for x in latents]
    writer = writer or Mp4Writer()
    paths = [writer.write(v, p, plan.fps) for v, p in zip(videos, paths, strict=True)]
    sheet = save_png(contact_sheet(videos, captions=list(request.prompts)), sheet_path)
    log.info("generated", videos=[str(p) for p in paths], contact_sheet=str(sheet))
    return paths


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


@attrs.frozen(kw_only=True)
class SamplingPlan:
    """A request's sampling values, the checkpoint's ``sample`` (and ``data.fps``) defaults filled in."""

    sampler: str
    """The sampler, one that fits the model's diffusion process."""
    steps: int
    """Solver steps."""
    guidance: float
    """Classifier-free guidance scale."""
    shift: float | None
    """Flow shift (``None``: the process's own)."""
    frames: int
    """Frames of each video."""
    height: int
    """Height in pixels."""
    width: int
    """Width in pixels."""
    fps: float
    """Frame rate of the mp4 files."""


def check_process(request: GenerateRequest, cfg: TrainConfig) -> str:
    """The sampler (``--sampler`` or ``sample.sampler``), checked, with ``--shift``, against the diffusion process.

    Raises:
        ValueError: A sampler of the other process, or ``shift`` for an EDM model (its Karras schedule has none).
    """
    kind = cfg.diffusion.kind
    sampler = request.sampler or cfg.sample.sampler
    allowed = FLOW_SAMPLERS if kind == "flow" else EDM_SAMPLERS
    what = "a flow-matching" if kind == "flow" else "an EDM"
    if sampler not in allowed:
        raise ValueError(
            f"--sampler {sampler} does not fit {what} model (diffusion.kind={kind}); use {' or '.join(allowed)}"
        )
    if request.shift is not None and kind != "flow":
        raise ValueError(
            f"--shift applies to flow-matching models only (diffusion.kind=flow); {request.checkpoint} holds an EDM "
            "model (diffusion.kind=edm), whose Karras noise schedule has no shift: drop --shift"
        )
    return sampler


def sampling_plan(request: GenerateRequest, cfg: TrainConfig, latent: LatentSpec) -> SamplingPlan:
    """The request's values with the defaults of ``cfg.sample`` filled in, checked against the model.

    Raises:
        ValueError: A sampler of the other diffusion process, ``shift`` for an EDM model, or a video size that
            the codec's strides and the model's patch size cannot take (naming the option, the valid sizes and
            the nearest ones).
    """
    s = cfg.sample
    sampler = check_process(request, cfg)
    frames = _fitting("frames", request.frames, s.frames, *_frame_grid(latent, cfg.model))
    height = _fitting("height", request.height, s.height, *_pixel_grid(latent, cfg.model, 1))
    width = _fitting("width", request.width, s.width, *_pixel_grid(latent, cfg.model, 2))
    return SamplingPlan(
        sampler=sampler,
        steps=s.steps if request.steps is None else request.steps,
        guidance=s.guidance if request.guidance is None else request.guidance,
        shift=s.shift if request.shift is None else request.shift,
        frames=frames,
        height=height,
        width=width,
        fps=cfg.data.fps if request.fps is None else request.fps,
    )


def _frame_grid(latent: LatentSpec, model: ModelSpec) -> tuple[int, int, str]:
    """``(first, step, why)`` of the frame counts that fit: the causal VAE makes ``1 + (F - 1) / stride`` latent
    frames, and the model patches ``patch_size[0]`` of them together."""
    stride, patch = latent.temporal_stride, model.patch_size[0]
    why = f"VAE temporal stride {stride}: 1 + a multiple of {stride} frames"
    if patch > 1:
        why += f", in groups of {patch} latent frames (model patch {patch})"
    return 1 + stride * (patch - 1), stride * patch, why


def _pixel_grid(latent: LatentSpec, model: ModelSpec, axis: int) -> tuple[int, int, str]:
    """``(first, step, why)`` of the heights (``axis`` 1) or widths (2) that fit: multiples of stride x patch."""
    stride, patch = latent.spatial_stride, model.patch_size[axis]
    step = stride * patch
    return step, step, f"VAE spatial stride {stride} x model patch {patch}"


def _fitting(name: str, asked: int | None, default: int, first: int, step: int, why: str) -> int:
    """``asked`` (or ``default``) when it is ``first + k * step``; else a ``ValueError`` with the nearest sizes."""
    value = default if asked is None else asked
    if value >= first and (value - first) % step == 0:
        return value
    below = first + (value - first) // step * step if value > first else None
    nearest = f"{below} or {below + step}" if below is not None else str(first)
    source = f"--{name} {value}" if asked is not None else f"sample.{name}={value} (the checkpoint's default)"
    grid = ", ".join(str(first + k * step) for k in range(3))
    fix = f"pass --{name} {nearest}" if asked is None else f"nearest: {nearest}"
    raise ValueError(f"{source} does not fit this model: {name} must be one of {grid}, ... ({why}); {fix}")


def with_codecs(cfg: TrainConfig, request: GenerateRequest) -> TrainConfig:
    """``cfg`` with the request's ``vae`` / ``text_encoder`` / ``tokenizer`` in place of the recorded ``codecs.*``.

    A new ``text_encoder`` without a ``tokenizer`` also drops the recorded tokenizer (it belongs to the old one).
    """
    c = cfg.codecs
    tokenizer = request.tokenizer or (None if request.text_encoder else c.tokenizer)
    codecs = CodecsConfig(
        vae=request.vae or c.vae, text_encoder=request.text_encoder or c.text_encoder, tokenizer=tokenizer
    )
    return attrs.evolve(cfg, codecs=codecs)


def _codecs(cfg: TrainConfig, checkpoint: Path) -> tuple[LatentCodec, TextEncoder]:
    try:
        codec, text_encoder = bootstrap.build_codecs(cfg)
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


def _embed(text_encoder: TextEncoder, prompts: Sequence[str], cfg: TrainConfig, device: torch.device):
    emb, mask = text_encoder.encode(list(prompts), cfg.data.text_len)
    return emb.to(device), mask.to(device)


@torch.no_grad()
def _one_video(
    request: GenerateRequest,
    plan: SamplingPlan,
    cfg: TrainConfig,
    model: torch.nn.Module,
    codec: LatentCodec,
    text_encoder: TextEncoder,
    prompt: str,
    device: torch.device,
    index: int,
) -> torch.Tensor:
    shape = codec.latent_spec.latent_shape(plan.frames, plan.height, plan.width)
    generator = torch.Generator().manual_seed(request.seed + index)
    noise = torch.randn((1, *shape), generator=generator).to(device)
    text, mask = _embed(text_encoder, [prompt], cfg, device)
    null = _embed(text_encoder, [request.negative_prompt], cfg, device) if request.negative_prompt else (None, None)
    desc = f"sampling {index + 1}/{len(request.prompts)}"
    with tqdm(total=plan.steps, desc=desc, disable=not request.progress) as bar:
        latents = sample_latents(
            model,
            cfg.diffusion,
            noise,
            sampler=plan.sampler,
            steps=plan.steps,
            guidance=plan.guidance,
            text=text,
            text_mask=mask,
            null_text=null[0],
            null_text_mask=null[1],
            shift=plan.shift,
            generator=generator,
            callback=lambda i, n, x: bar.update(1),
        )
    return latents


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
