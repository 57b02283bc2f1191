"""The generation service: checkpoint + prompts -> mp4 videos and a PNG contact sheet.

```python
from dfm.app.services.generation import GenerateRequest, generate
paths = generate(GenerateRequest(checkpoint="runs/demo", prompts=["a red circle moving left slowly"], out="out.mp4"))
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from tqdm import tqdm

from dfm.adapters.video import Mp4Writer, contact_sheet, save_png, to_uint8_frames
from dfm.app import bootstrap
from dfm.app.config import CodecsConfig, ConfigError, TrainConfig, config_from_yaml
from dfm.app.logging import get_logger
from dfm.app.services.checkpoints import load_for_inference
from dfm.domain.sampling import sample_latents
from dfm.ports.codecs import LatentCodec, TextEncoder
from dfm.ports.tracking import VideoWriter

log = get_logger("dfm.generate")


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
    steps: int | None = None
    """Sampling steps."""
    guidance: float | None = None
    """Classifier-free guidance scale (1 = no guidance)."""
    shift: float | None = None
    """Flow shift at sampling time."""
    seed: int = 0
    """Seed of the initial noise (the same seed gives the same video)."""
    frames: int | None = None
    """Frames of the video."""
    height: int | None = None
    """Height in pixels."""
    width: int | None = None
    """Width in pixels."""
    fps: float | None = None
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

    def __attrs_post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        if self.out.suffix.lower() != ".mp4":
            raise ValueError(f"--out must name an .mp4 file, got {self.out}")


def output_paths(out: Path, n: int) -> list[Path]:
    """``out`` for one video, ``out_00.mp4``... for several."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(n)]


def generate(request: GenerateRequest, *, writer: VideoWriter | None = None) -> list[Path]:
    """Generate one video per prompt; returns the mp4 paths (the contact sheet is ``out`` with ``.png``)."""
    cfg, model = load_for_inference(request.checkpoint, use_ema=request.use_ema)
    cfg = with_codecs(cfg, request)
    codec, text_encoder = _codecs(cfg, request.checkpoint)
    device = next(model.parameters()).device
    videos = [
        _one_video(request, cfg, model, codec, text_encoder, prompt, device, i)
        for i, prompt in enumerate(request.prompts)
    ]
    writer = writer or Mp4Writer()
    fps = request.fps or cfg.data.fps
    paths = [writer.write(v, p, fps) for v, p in zip(videos, output_paths(request.out, len(videos)), strict=True)]
    sheet = save_png(contact_sheet(videos, captions=list(request.prompts)), request.out.with_suffix(".png"))
    log.info("generated", videos=[str(p) for p in paths], contact_sheet=str(sheet))
    return paths


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
    cfg: TrainConfig,
    model: torch.nn.Module,
    codec: LatentCodec,
    text_encoder: TextEncoder,
    prompt: str,
    device: torch.device,
    index: int,
) -> torch.Tensor:
    s = cfg.sample
    frames, height, width = request.frames or s.frames, request.height or s.height, request.width or s.width
    shape = codec.latent_spec.latent_shape(frames, height, width)
    generator = torch.Generator().manual_seed(request.seed + index)
    noise = torch.randn((1, *shape), generator=generator).to(device)
    text, mask = _embed(text_encoder, [prompt], cfg, device)
    null = _embed(text_encoder, [request.negative_prompt], cfg, device) if request.negative_prompt else (None, None)
    steps = request.steps or s.steps
    with tqdm(total=steps, desc=f"sampling {index + 1}/{len(request.prompts)}", disable=not request.progress) as bar:
        latents = sample_latents(
            model,
            cfg.diffusion,
            noise,
            sampler=request.sampler or s.sampler,
            steps=steps,
            guidance=s.guidance if request.guidance is None else request.guidance,
            text=text,
            text_mask=mask,
            null_text=null[0],
            null_text_mask=null[1],
            shift=request.shift if request.shift is not None else s.shift,
            generator=generator,
            callback=lambda i, n, x: bar.update(1),
        )
    pixels = codec.decode(latents.float().cpu())
    return to_uint8_frames(pixels[0])


def config_of(checkpoint_meta: dict) -> TrainConfig:
    """The resolved training config stored in a checkpoint's meta."""
    return config_from_yaml(checkpoint_meta["config"], source="checkpoint meta.json")
