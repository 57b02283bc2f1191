"""The composition root's codecs: the VAE, text and image encoders a config names (pretrained or the toy ones),
and the latent space they give."""

from __future__ import annotations

import torch

from dfm.adapters.diffusers import (  # diffusers loads on use
    UMT5TextEncoder,
    WanVAECodec,
)
from dfm.adapters.diffusers.clip_image import CLIPImageEncoder
from dfm.adapters.synthetic import (
    HashTextEncoder,
    IdentityPixelCodec,
    PatchImageEncoder,
)
from dfm.app.config import ConfigError, TrainConfig
from dfm.domain.specs import LatentSpec
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder


def build_codecs(cfg: TrainConfig, *, vae_tiling: bool = False) -> tuple[LatentCodec | None, TextEncoder | None]:
    """The pixel codec and text encoder the data (and generation) use (``vae_tiling``: the WAN VAE works in
    overlapping spatial tiles, for less memory).

    ``codecs.vae`` / ``codecs.text_encoder`` select the WAN 2.1 VAE / UMT5 from local directories (their
    weights load on first use, so building them to learn the latent shape is cheap). Unset, ``synthetic``
    data use the toy codecs (pixels as latents, hashed words) and ``mock`` data have no pixel codec and
    the hashed-word encoder. ``energon`` / ``hf_datasets`` data are latents and embeddings already: the
    pixel codec is the configured VAE or ``None``, the text encoder (needed only to sample) the configured
    UMT5 or ``None``.

    Raises:
        ConfigError: Naming ``codecs.*`` for a directory that is not a WAN VAE / UMT5 or does not fit ``model``.
    """
    source = cfg.data.source
    if source not in ("synthetic", "mock", "energon", "hf_datasets"):
        raise ConfigError(f"data.source: {source!r} is unknown; use synthetic, mock, energon or hf_datasets")
    vae, text = _pretrained_vae(cfg, vae_tiling), _pretrained_text_encoder(cfg)
    if source == "synthetic":
        return vae or IdentityPixelCodec(), text or HashTextEncoder(dim=cfg.model.text_dim)
    if source == "mock":
        return vae, text or HashTextEncoder(dim=cfg.model.text_dim)
    return vae, text


def _codec_device() -> tuple[str, str]:
    """This process's device for the pretrained codecs and the text encoder's dtype there (bf16 on CUDA, as WAN)."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}", "bf16"
    return "cpu", "fp32"


def _pretrained_vae(cfg: TrainConfig, tiling: bool = False) -> LatentCodec | None:
    if cfg.codecs.vae is None:
        return None
    try:
        vae = WanVAECodec(cfg.codecs.vae, device=_codec_device()[0], dtype="fp32", tiling=tiling)
    except ValueError as exc:
        raise ConfigError(f"codecs.vae: {exc}") from None
    i2v = getattr(cfg.model, "image_to_video", False)  # its input adds a mask and condition latents
    key, channels = ("out_channels", cfg.model.out_channels) if i2v else ("in_channels", cfg.model.in_channels)
    if vae.latent_spec.channels != channels:
        raise ConfigError(
            f"codecs.vae: {vae.identity} has {vae.latent_spec.channels} latent channels, but model.{key} is {channels}"
        )
    return vae


def build_image_encoder(cfg: TrainConfig) -> ImageEncoder | None:
    """The CLIP image encoder ``codecs.image_encoder`` names (``None`` when unset).

    Raises:
        ConfigError: Naming ``codecs.image_encoder`` for a directory that is not one, or whose width is not the
            model's ``image_dim``.
    """
    where = cfg.codecs.image_encoder
    if where is None:  # synthetic data condition on their own first frames through the toy encoder
        if getattr(cfg.model, "image_to_video", False) and cfg.data.source == "synthetic":
            return _toy_image_encoder(cfg)
        return None
    device, dtype = _codec_device()
    try:
        encoder = CLIPImageEncoder(where, device=device, dtype=dtype)
    except ValueError as exc:
        raise ConfigError(f"codecs.image_encoder: {exc}") from None
    if encoder.dim != getattr(cfg.model, "image_dim", None):
        raise ConfigError(
            f"codecs.image_encoder: {encoder.identity} gives {encoder.dim}-wide features, but model.image_dim is "
            f"{getattr(cfg.model, 'image_dim', None)}"
        )
    return encoder


def _toy_image_encoder(cfg: TrainConfig) -> ImageEncoder:
    encoder = PatchImageEncoder()
    if encoder.dim != cfg.model.image_dim:
        raise ConfigError(
            f"model.image_dim: synthetic image-to-video data give {encoder.dim}-wide image features (4 x 4 RGB "
            f"pixel blocks), but model.image_dim is {cfg.model.image_dim}"
        )
    return encoder


def _pretrained_text_encoder(cfg: TrainConfig) -> TextEncoder | None:
    c = cfg.codecs
    if c.text_encoder is None:
        return None
    device, dtype = _codec_device()
    try:
        text = UMT5TextEncoder(c.text_encoder, tokenizer=c.tokenizer, device=device, dtype=dtype)
    except ValueError as exc:
        bad_tokenizer = c.tokenizer is not None and "tokenizer directory" in str(exc)
        key = "codecs.tokenizer" if bad_tokenizer else "codecs.text_encoder"
        raise ConfigError(f"{key}: {exc}") from None
    if text.dim != cfg.model.text_dim:
        raise ConfigError(
            f"codecs.text_encoder: {text.identity} embeds {text.dim}-wide vectors, "
            f"but model.text_dim is {cfg.model.text_dim}"
        )
    return text


def latent_spec(cfg: TrainConfig, codec: LatentCodec | None) -> LatentSpec:
    """The data's latent space: the codec's, or for ``mock`` data a WAN-VAE-like one with the model's channels."""
    if codec is not None:
        return codec.latent_spec
    i2v = getattr(cfg.model, "image_to_video", False)  # its input adds the condition channels to the latents
    return LatentSpec(channels=cfg.model.out_channels if i2v else cfg.model.in_channels)


def latent_shape(cfg: TrainConfig, codec: LatentCodec | None) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the training latents."""
    d = cfg.data
    try:
        return latent_spec(cfg, codec).latent_shape(d.frames, d.height, d.width)
    except ValueError as exc:
        raise ConfigError(f"data: {exc} (data.frames/height/width do not fit the codec)") from None


def prepare_codecs(
    vae: str | None, text_encoder: str | None, *, tokenizer: str | None, device: str, dtype: str
) -> tuple[LatentCodec, TextEncoder]:
    """The codecs ``python -m dfm.app.prepare`` encodes with: the WAN VAE / UMT5 of local directories, or the toy
    codecs (pixels as latents, hashed words) where a directory is ``None``.

    Raises:
        ValueError: For a directory that is not a WAN VAE / UMT5 (or its tokenizer).
    """
    codec: LatentCodec = IdentityPixelCodec() if vae is None else WanVAECodec(vae, device=device, dtype=dtype)
    if text_encoder is None:
        return codec, HashTextEncoder()
    return codec, UMT5TextEncoder(text_encoder, tokenizer=tokenizer, device=device, dtype=dtype)


def prepare_image_encoder(path: str | None, *, device: str, dtype: str) -> ImageEncoder:
    """The image encoder ``python -m dfm.app.prepare --image-condition`` embeds the conditioning frames with: the
    CLIP vision model of a local directory, or the toy :class:`PatchImageEncoder` (4 x 4 pixel blocks, what
    ``synthetic`` image-to-video data use) where ``path`` is ``None``.

    Raises:
        ValueError: For a directory that is not a CLIP vision model.
    """
    if path is None:
        return PatchImageEncoder()
    return CLIPImageEncoder(path, device=device, dtype=dtype)
