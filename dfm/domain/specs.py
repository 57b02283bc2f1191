"""Model and latent specs, with the analytic training FLOPs per sample and per batch that ran.

Field names of :class:`WanSpec` equal the config keys of diffusers' ``WanTransformer3DModel`` so that
a spec is its ``config.json`` and back (text-to-video and image-to-video).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
from attrs import validators as v

from dfm.domain.batch import Batch, PackedBatch

_positive = v.gt(0)
IMAGE_TOKENS = 257
"""Image tokens an image-to-video WAN reads per image (CLIP ViT-H/14 at 224 px: 16 x 16 patches + class token)."""


def _patch_validator(_inst: object, attr: attrs.Attribute, value: tuple[int, int, int]) -> None:
    if len(value) != 3 or any(int(p) <= 0 for p in value):
        raise ValueError(f"{attr.name} must be three positive ints (t, h, w), got {value!r}")


def _to_patch(value: object) -> tuple[int, int, int]:
    return tuple(int(p) for p in value)  # type: ignore[attr-defined,return-value]


@attrs.frozen(kw_only=True)
class WanSpec:
    """WAN 2.1 text-to-video transformer (Wan Team, "Wan: Open and Advanced Large-Scale Video
    Generative Models", 2025); field names follow diffusers' ``WanTransformer3DModel``."""

    arch: Literal["wan"] = "wan"
    """Architecture tag of the ``model`` config section."""
    patch_size: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=_to_patch, validator=_patch_validator)
    """Patch size (t, h, w) over the latent."""
    num_attention_heads: int = attrs.field(default=12, validator=_positive)
    """Attention heads per layer."""
    attention_head_dim: int = attrs.field(default=128, validator=_positive)
    """Channels per head; the hidden size is ``num_attention_heads * attention_head_dim``."""
    in_channels: int = attrs.field(default=16, validator=_positive)
    """Latent channels in."""
    out_channels: int = attrs.field(default=16, validator=_positive)
    """Latent channels out."""
    text_dim: int = attrs.field(default=4096, validator=_positive)
    """Width of the text-encoder embeddings (UMT5-XXL: 4096)."""
    freq_dim: int = attrs.field(default=256, validator=_positive)
    """Width of the sinusoidal timestep features."""
    ffn_dim: int = attrs.field(default=8960, validator=_positive)
    """Hidden width of the feed-forward network."""
    num_layers: int = attrs.field(default=30, validator=_positive)
    """Number of transformer blocks."""
    cross_attn_norm: bool = True
    """Layer norm before cross-attention."""
    qk_norm: Literal["rms_norm_across_heads"] = "rms_norm_across_heads"
    """Query/key normalisation (RMSNorm over all heads together)."""
    eps: float = attrs.field(default=1e-6, validator=_positive)
    """Norm epsilon."""
    rope_max_seq_len: int = attrs.field(default=1024, validator=_positive)
    """Largest position per axis the 3D RoPE tables cover."""
    image_dim: int | None = attrs.field(default=None, validator=v.optional(_positive))
    """Image-to-video: width of the image-encoder features (CLIP ViT-H/14's penultimate layer: 1280), which the
    condition embedder projects and cross-attention reads through its own keys and values; ``None``:
    text-to-video."""
    added_kv_proj_dim: int | None = attrs.field(default=None, validator=v.optional(_positive))
    """Image-to-video: input width of cross-attention's image keys and values (``add_k_proj``/``add_v_proj``): the
    hidden size; ``None`` exactly when ``image_dim`` is."""
    pos_embed_seq_len: int | None = attrs.field(default=None, validator=v.optional(_positive))
    """First-last-frame image-to-video: rows of a learned position embedding added to the two images' features
    (2 x 257); ``None``: none."""

    def __attrs_post_init__(self) -> None:
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                f"image_dim ({self.image_dim}) and added_kv_proj_dim ({self.added_kv_proj_dim}) must be set together "
                "(image-to-video) or both be null (text-to-video)"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.hidden_size:
            raise ValueError(
                f"added_kv_proj_dim must equal the hidden size {self.hidden_size} (the image embedder's output), "
                f"got {self.added_kv_proj_dim}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len applies to image-to-video models only (set image_dim)")

    @property
    def hidden_size(self) -> int:
        """Model width ``h``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def image_to_video(self) -> bool:
        """Whether the network reads image features besides the text."""
        return self.image_dim is not None


@attrs.frozen(kw_only=True)
class DiTSpec:
    """Diffusion transformer for EDM (Peebles & Xie, "Scalable Diffusion Models with Transformers",
    2023): adaLN-zero blocks with self-attention, cross-attention to text and 3D RoPE."""

    arch: Literal["dit"] = "dit"
    """Architecture tag of the ``model`` config section."""
    patch_size: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=_to_patch, validator=_patch_validator)
    """Patch size (t, h, w) over the latent."""
    num_attention_heads: int = attrs.field(default=16, validator=_positive)
    """Attention heads per layer."""
    attention_head_dim: int = attrs.field(default=72, validator=_positive)
    """Channels per head; the hidden size is ``num_attention_heads * attention_head_dim``."""
    in_channels: int = attrs.field(default=16, validator=_positive)
    """Latent channels in."""
    out_channels: int = attrs.field(default=16, validator=_positive)
    """Latent channels out."""
    text_dim: int = attrs.field(default=4096, validator=_positive)
    """Width of the text embeddings."""
    freq_dim: int = attrs.field(default=256, validator=_positive)
    """Width of the sinusoidal noise-level features."""
    ffn_dim: int = attrs.field(default=4608, validator=_positive)
    """Hidden width of the MLP (4 x hidden in the paper)."""
    num_layers: int = attrs.field(default=28, validator=_positive)
    """Number of blocks."""
    eps: float = attrs.field(default=1e-6, validator=_positive)
    """Norm epsilon."""

    @property
    def hidden_size(self) -> int:
        """Model width ``h``."""
        return self.num_attention_heads * self.attention_head_dim


ModelSpec = WanSpec | DiTSpec


@attrs.frozen(kw_only=True)
class LatentSpec:
    """Shape of the latent space a VAE maps videos into (WAN 2.1 VAE: 16 channels, stride 4x8x8)."""

    channels: int = attrs.field(default=16, validator=_positive)
    """Latent channels."""
    temporal_stride: int = attrs.field(default=4, validator=_positive)
    """Frames per latent frame (after the first)."""
    spatial_stride: int = attrs.field(default=8, validator=_positive)
    """Pixels per latent pixel along height and width."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, F', H', W')`` of a ``frames x height x width`` video (causal VAE: ``F' = 1 + (F-1)/4``)."""
        for name, n, s in (
            ("frames-1", frames - 1, self.temporal_stride),
            ("height", height, self.spatial_stride),
            ("width", width, self.spatial_stride),
        ):
            if n < 0 or n % s:
                raise ValueError(f"{name}={n} must be a non-negative multiple of {s}")
        return (
            self.channels,
            1 + (frames - 1) // self.temporal_stride,
            height // self.spatial_stride,
            width // self.spatial_stride,
        )


# Named specs ------------------------------------------------------------------------------------

WAN_1_3B = WanSpec(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN_14B = WanSpec(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
WAN_TINY = WanSpec(
    num_attention_heads=2,
    attention_head_dim=12,
    ffn_dim=48,
    num_layers=2,
    text_dim=32,
    freq_dim=16,
    in_channels=4,
    out_channels=4,
)
DIT_S = DiTSpec(num_attention_heads=6, attention_head_dim=64, ffn_dim=1536, num_layers=12)
DIT_B = DiTSpec(num_attention_heads=12, attention_head_dim=64, ffn_dim=3072, num_layers=12)
DIT_L = DiTSpec(num_attention_heads=16, attention_head_dim=64, ffn_dim=4096, num_layers=24)
DIT_XL = DiTSpec(num_attention_heads=16, attention_head_dim=72, ffn_dim=4608, num_layers=28)
DIT_TINY = DiTSpec(
    num_attention_heads=2,
    attention_head_dim=12,
    ffn_dim=48,
    num_layers=2,
    text_dim=32,
    freq_dim=16,
    in_channels=4,
    out_channels=4,
)

NAMED_SPECS: dict[str, ModelSpec] = {
    "wan-1.3b": WAN_1_3B,
    "wan-14b": WAN_14B,
    "wan-tiny": WAN_TINY,
    "dit-s": DIT_S,
    "dit-b": DIT_B,
    "dit-l": DIT_L,
    "dit-xl": DIT_XL,
    "dit-tiny": DIT_TINY,
}


# FLOPs ------------------------------------------------------------------------------------------


def num_tokens(spec: ModelSpec, latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Video tokens ``L`` after patchifying a latent of the given size."""
    pt, ph, pw = spec.patch_size
    if latent_frames % pt or latent_height % ph or latent_width % pw:
        raise ValueError(
            f"latent {latent_frames}x{latent_height}x{latent_width} is not divisible by patch {spec.patch_size}"
        )
    return (latent_frames // pt) * (latent_height // ph) * (latent_width // pw)


def forward_flops(spec: ModelSpec, video_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one sample (multiply-add = 2 FLOPs).

    Per block: ``12 L h^2 + 4 L h ffn + 4 S h^2 + 4 L^2 h + 4 L S h`` (self-attention q/k/v/o and
    cross-attention q/o over ``L`` video tokens, cross-attention k/v over ``S`` text tokens, the FFN,
    and the two attention products); plus the patch embedding, text projection and output head. An
    image-to-video WAN adds ``4 R h^2 + 4 L R h`` per block for its ``R`` = 257 image tokens and the image
    embedder's two linears.
    """
    L, S, h = video_tokens, text_tokens, spec.hidden_size
    block = 12 * L * h * h + 4 * L * h * spec.ffn_dim + 4 * S * h * h + 4 * L * L * h + 4 * L * S * h
    image, embed_image = getattr(spec, "image_dim", None), 0
    if image is not None:  # WAN I2V: the image tokens' keys/values and attention to them; the image embedder
        block += 4 * IMAGE_TOKENS * h * h + 4 * L * IMAGE_TOKENS * h
        embed_image = 2 * IMAGE_TOKENS * image * image + 2 * IMAGE_TOKENS * image * h
    patch = spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2]
    embed = 2 * L * spec.in_channels * patch * h + 2 * S * spec.text_dim * h + 2 * S * h * h
    head = 2 * L * h * spec.out_channels * patch
    return float(spec.num_layers * block + embed + embed_image + head)


def training_flops(spec: ModelSpec, video_tokens: int, text_tokens: int) -> float:
    """Training FLOPs of one sample: 3x forward (backward = 2x forward; recompute not counted)."""
    return 3.0 * forward_flops(spec, video_tokens, text_tokens)


def sample_lengths(spec: ModelSpec, batch: Batch | PackedBatch) -> list[tuple[int, int]]:
    """``(L_i, S)`` of every sample of ``batch``, from the shapes it actually has.

    ``L_i`` are the video tokens of sample ``i``'s own latent ``[C, F_i, H_i, W_i]`` patchified with
    ``spec.patch_size`` (the samples of a :class:`PackedBatch` may differ; those of a :class:`Batch`
    share one shape); ``S`` is the text length the network ran over, the batch's (padded) ``text.shape[1]``.

    Raises:
        ValueError: If a latent is not divisible by the patch size.
    """
    text_tokens = int(batch.text.shape[1])
    if isinstance(batch, PackedBatch):
        shapes = [tuple(x.shape) for x in batch.latents]
    else:
        shapes = [tuple(batch.latents.shape[1:])] * batch.size
    return [(num_tokens(spec, *(int(n) for n in shape[-3:])), text_tokens) for shape in shapes]


def batch_video_tokens(spec: ModelSpec, batch: Batch | PackedBatch) -> int:
    """Video tokens of all samples of ``batch``, ``sum_i L_i`` (see :func:`sample_lengths`)."""
    return sum(length for length, _ in sample_lengths(spec, batch))


def batch_training_flops(spec: ModelSpec, batch: Batch | PackedBatch) -> float:
    """Training FLOPs of ``batch``: the sum of every sample's :func:`training_flops` at its own ``(L_i, S)``.

    Attention stays inside each sample of a packed sequence, so its quadratic term is ``sum_i L_i^2``,
    never ``(sum_i L_i)^2``.
    """
    return math.fsum(training_flops(spec, length, text) for length, text in sample_lengths(spec, batch))
