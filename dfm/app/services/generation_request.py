"""What ``generate`` is asked for, checked before any weights load: :class:`GenerateRequest` and its
:class:`SamplingPlan` (the request's values with the checkpoint's ``sample`` defaults filled in, fitted to the
model's VAE stride and patch size)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import attrs

from dfm.app.config import CodecsConfig, TrainConfig
from dfm.app.config.sample import EDM_SAMPLERS, FLOW_SAMPLERS
from dfm.app.config.training import ATTENTION_BACKENDS
from dfm.domain.networks.step_cache import CACHE_METHODS, StepCacheConfig
from dfm.domain.specs import LatentSpec, ModelSpec

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


def _choice(option: str, choices: tuple[str, ...]) -> Validator:
    """A validator refusing anything but ``None`` or one of ``choices``, naming the CLI ``option``."""

    def check(_inst: object, _attr: attrs.Attribute[object], value: object) -> None:
        if value is not None and value not in choices:
            raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")

    return check


PRECISIONS = ("auto", "bf16", "fp32")
"""``--precision`` values: ``auto`` is bf16 on CUDA and fp32 on the CPU."""
CFG_MODES = ("auto", "batched", "separate")
"""``--cfg`` values: guidance's two passes as one forward over the doubled batch, or as two forwards; ``auto``
is ``separate`` in one process (as fast on an H100, half the activation memory) and ``batched`` under CFG
parallelism (each rank then runs one of the two passes) or with a step cache (see :func:`cfg_mode`)."""


def cfg_mode(request: GenerateRequest, cfg_parallel: int = 1) -> str:
    """``"batched"`` or ``"separate"``: ``request.cfg`` with ``auto`` resolved.

    ``auto`` is ``batched`` under CFG parallelism (``cfg_parallel > 1``: the two passes travel as one batch split
    over ranks) and with a step cache (it keeps one state per row of a forward, so the conditional and
    unconditional passes must be rows of the same call, not consecutive calls), else ``separate``.
    """
    if request.cfg != "auto":
        return request.cfg
    return "batched" if cfg_parallel > 1 or request.cache is not None else "separate"


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
    # Speed and memory (none of these changes what is sampled beyond float rounding) ---------------
    precision: str = attrs.field(default="auto", validator=_choice("--precision", PRECISIONS))
    """Weights and compute: ``bf16`` (the time embedding, modulation tables and norms stay float32, as diffusers
    keeps them), ``fp32``, or ``auto`` (bf16 on CUDA, fp32 on the CPU)."""
    attention: str | None = attrs.field(default=None, validator=_choice("--attention", ATTENTION_BACKENDS))
    """SDPA backend (``None``: the run's ``train.attention_backend``)."""
    compile: bool = False
    """``torch.compile`` each transformer block once, reused by every step and prompt (CUDA; the first step
    pays the compilation)."""
    cfg: str = attrs.field(default="auto", validator=_choice("--cfg", CFG_MODES))
    """Guidance's conditional and unconditional passes as one forward over the doubled batch, or two forwards."""
    batch_size: int = attrs.field(default=1, validator=_int_option("--batch-size", 1))
    """Prompts sampled together in one forward (memory grows with it)."""
    vae_tiling: bool = False
    """Decode the latents tile by tile (less memory, slower; for large videos on small GPUs)."""
    # Multi-process generation under torchrun (see parallel_layout) -------------------------------
    cfg_parallel: bool | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool))
    )
    """Run the conditional and unconditional passes of guidance on two ranks (``None``: when guidance is on and
    the process count is even)."""
    context_parallel: int | None = attrs.field(default=None, validator=_int_option("--context-parallel", 1))
    """Ranks that split each video's tokens (``None``: the processes CFG parallelism leaves)."""
    image: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    """Image-to-video models: the first frame (any image file; scaled and centre-cropped to the video's size)."""
    last_image: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    """First-last-frame models: the last frame."""
    image_encoder: str | None = None
    """CLIP image encoder directory replacing the checkpoint's ``codecs.image_encoder``."""
    loras: tuple[tuple[Path, float], ...] = attrs.field(default=(), converter=tuple)
    """LoRA files (diffusers, WAN/kohya or musubi naming) and scales, folded into the weights before sampling."""

    def __attrs_post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        if self.out.suffix.lower() != ".mp4":
            raise ValueError(f"--out must name an .mp4 file, got {self.out}")


def output_paths(out: Path, n: int) -> list[Path]:
    """``out`` for one video, ``out_00.mp4``... for several."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(n)]


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


def check_image(request: GenerateRequest, cfg: TrainConfig) -> None:
    """Raise ``ValueError`` unless ``--image``/``--last-image`` fit the model (image-to-video, first-last-frame).

    Raises:
        ValueError: No ``--image`` for an image-to-video model, one for a text-to-video model, ``--last-image``
            without a first-last-frame model (or the reverse), or an image file that does not exist.
    """
    spec = cfg.model
    i2v, flf = getattr(spec, "image_to_video", False), getattr(spec, "pos_embed_seq_len", None) is not None
    if i2v and request.image is None:
        raise ValueError(f"{request.checkpoint} is an image-to-video model: pass --image FIRST_FRAME (a picture)")
    if not i2v and request.image is not None:
        raise ValueError(f"--image: {request.checkpoint} is a text-to-video model (model.image_dim is null)")
    if flf != (request.last_image is not None):
        need = "needs --last-image LAST_FRAME" if flf else "takes no --last-image (model.pos_embed_seq_len is null)"
        raise ValueError(
            f"{request.checkpoint} is {'a first-last-frame' if flf else 'not a first-last-frame'} model: it {need}"
        )
    for option, path in (("--image", request.image), ("--last-image", request.last_image)):
        if path is not None and not path.is_file():
            raise ValueError(f"{option}: {path} does not exist")


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
        vae=request.vae or c.vae,
        text_encoder=request.text_encoder or c.text_encoder,
        tokenizer=tokenizer,
        image_encoder=request.image_encoder or c.image_encoder,
    )
    return attrs.evolve(cfg, codecs=codecs)
