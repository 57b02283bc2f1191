"""Layers shared by the video transformers: 3D RoPE, timestep features, norms, patchify.

Numerics follow diffusers (``WanRotaryPosEmbed``, ``get_timestep_embedding``, ``FP32LayerNorm``) so
that networks built from these layers reproduce diffusers' outputs to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.domain.packing import PackedLayout, unpack_tokens

Grid = tuple[int, int, int]
"""Token grid ``(F, H, W)`` after patchifying: frames, height, width in patches."""

RMSNorm = nn.RMSNorm
"""Root-mean-square norm (Zhang & Sennrich, 2019); torch's own, as diffusers' WAN uses it."""


# Rotary position embedding ---------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """WAN's split of a head's channels among the (t, h, w) axes: h and w get ``2 * (D // 6)`` each.

    Args:
        head_dim: Channels per attention head ``D`` (even).

    Returns:
        ``(d_t, d_h, d_w)`` with ``d_t = D - 4 * (D // 6)``.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"3D RoPE needs a positive even head_dim, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _rope_1d(dim: int, length: int, theta: float, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """cos/sin ``[length, dim]`` (float64) of one axis, each frequency repeated for its (even, odd) pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_3d(
    head_dim: int, grid: Grid, *, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """3D rotary position embedding (Su et al., "RoFormer", 2021; WAN 2.1's axis split).

    The head channels are split among frame, height and width (:func:`rope_axis_dims`); each axis
    rotates its channel pairs by ``position * theta^(-2i/d)``. Computed on the fly in float64 for any
    grid, identical to diffusers' ``WanRotaryPosEmbed`` table for grids it covers.

    Args:
        head_dim: Channels per attention head.
        grid: Token grid ``(F, H, W)``.
        theta: RoPE base.
        device: Device of the returned tensors.

    Returns:
        ``(cos, sin)``, each ``[F * H * W, head_dim]`` float32, tokens in (f, h, w) row-major order.
    """
    f, h, w = grid
    axes = [_rope_1d(d, n, theta, device) for d, n in zip(rope_axis_dims(head_dim), grid, strict=True)]

    def spread(tables: list[Tensor]) -> Tensor:
        t, y, x = tables
        parts = (
            t.view(f, 1, 1, -1).expand(f, h, w, -1),
            y.view(1, h, 1, -1).expand(f, h, w, -1),
            x.view(1, 1, w, -1).expand(f, h, w, -1),
        )
        return torch.cat(parts, dim=-1).reshape(f * h * w, head_dim).float()

    return spread([c for c, _ in axes]), spread([s for _, s in axes])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` of ``x`` by the RoPE angles.

    The rotation runs in the promoted dtype of ``x`` and the tables (float32 for bf16 ``x``) and the
    result is cast back to ``x.dtype``, as diffusers' WAN attention does.

    Args:
        x: Queries or keys ``[B, H, L, D]``.
        cos: ``[L, D]`` from :func:`rope_3d`.
        sin: ``[L, D]`` from :func:`rope_3d`.

    Returns:
        The rotated tensor, shape and dtype of ``x``.
    """
    dtype = torch.promote_types(x.dtype, cos.dtype)
    c, s = cos[..., 0::2], sin[..., 1::2]
    pairs = x.to(dtype).unflatten(-1, (-1, 2))
    if eager_fusable(x) and _complex_viewable(pairs):  # one complex product instead of six real kernels and a stack
        rotated = torch.view_as_complex(pairs) * torch.complex(c.to(dtype), s.to(dtype))
        return torch.view_as_real(rotated).flatten(-2).type_as(x)
    x1, x2 = pairs.unbind(-1)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


def _complex_viewable(pairs: Tensor) -> bool:
    """Whether ``pairs`` ``[..., n, 2]`` (float32/64) can be viewed as ``n`` complex numbers in place."""
    strides = pairs.stride()
    return (
        pairs.dtype in (torch.float32, torch.float64)
        and strides[-1] == 1
        and pairs.storage_offset() % 2 == 0
        and all(st % 2 == 0 for st in strides[:-1])
    )


def eager_fusable(x: Tensor) -> bool:
    """Whether the eager fused forms of this module's element-wise steps apply to ``x``: a plain tensor (not a
    DTensor or another subclass) outside ``torch.compile``, which fuses the plain formulas into one kernel itself.

    The fused forms compute the same function with fewer passes over memory (an eager forward of WAN at 32,760
    tokens spends ~0.2 s a step in element-wise kernels); they differ from the plain ones by float rounding only.
    """
    return type(x) is Tensor and not torch.compiler.is_compiling()


# Timestep features -----------------------------------------------------------------------------


def timestep_features(
    t: Tensor, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal features of (fractional) timesteps (Ho et al., "DDPM", 2020; Vaswani et al., 2017).

    ``freq_i = max_period^(-i / (dim/2 - downscale_freq_shift))``; features ``[sin(t freq), cos(t freq)]``,
    or ``[cos, sin]`` with ``flip_sin_to_cos`` (diffusers ``get_timestep_embedding`` semantics).

    Args:
        t: Timesteps ``[B]``.
        dim: Feature width (an odd width is zero-padded).
        flip_sin_to_cos: Put the cosines first.
        downscale_freq_shift: Shift of the frequency exponent's denominator.
        max_period: Longest period.

    Returns:
        ``[B, dim]`` float32 features.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [B], got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    angles = t[:, None].float() * freqs[None, :]
    parts = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1, 0, 0)) if dim % 2 else emb


# Norms -----------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """Layer norm computed in float32 whatever the input dtype; the result returns to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x`` in float32."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (Peebles & Xie, "DiT", 2023)."""
    return x * (1 + scale) + shift


def norm_modulate(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``modulate(norm(x), shift, scale)`` computed in float32, returned in ``x.dtype``.

    ``shift``/``scale`` are ``[B, 1, h]`` (or per token ``[B, L, h]``). A modulation the whole batch shares
    (``[1, 1, h]``: one timestep, as in sampling) of a norm without affine of its own becomes that norm's affine:
    one layer-norm kernel instead of a norm, a multiply and an add.
    """
    shared = shift.shape[:-1] == scale.shape[:-1] == (1, 1)
    if shared and norm.weight is None and norm.bias is None and eager_fusable(x):
        h = x.shape[-1]
        weight, bias = (1 + scale).reshape(h).float(), shift.reshape(h).float()
        return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)
    return modulate(norm(x.float()), shift, scale).type_as(x)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """The gated residual ``x + y * gate`` (adaLN-Zero) computed in float32, returned in ``x.dtype``.

    Without autograd (sampling) one ``addcmul`` kernel reads ``x`` and ``y`` in their own dtype and writes the
    result in ``x.dtype``, instead of casts, a multiply and an add through float32 temporaries.
    """
    if not torch.is_grad_enabled() and eager_fusable(x):
        return torch.addcmul(x, y, gate, out=torch.empty_like(x))
    return (x.float() + y.float() * gate).type_as(x)


# Patchify --------------------------------------------------------------------------------------


def patch_grid(frames: int, height: int, width: int, patch: Grid) -> Grid:
    """Token grid of a ``frames x height x width`` latent cut into ``patch`` patches.

    Raises:
        ValueError: If a size is not divisible by its patch size.
    """
    sizes = (frames, height, width)
    if any(n % p for n, p in zip(sizes, patch, strict=True)):
        raise ValueError(f"latent {frames}x{height}x{width} is not divisible by patch {tuple(patch)}")
    return frames // patch[0], height // patch[1], width // patch[2]


class PatchEmbed3d(nn.Conv3d):
    """Non-overlapping 3D patch embedding: a Conv3d with kernel = stride = patch, returning tokens.

    Its parameters are those of the Conv3d (``weight``, ``bias``), so state-dict names equal a plain
    ``nn.Conv3d`` at the same place (diffusers' ``patch_embedding``).

    Args:
        in_channels: Latent channels ``C``.
        dim: Token width.
        patch: Patch size ``(pt, ph, pw)``.
    """

    def __init__(self, in_channels: int, dim: int, patch: Grid) -> None:
        super().__init__(in_channels, dim, kernel_size=tuple(patch), stride=tuple(patch))

    def forward(self, x: Tensor) -> Tensor:
        """Embed ``x`` ``[B, C, F, H, W]`` into tokens ``[B, L, dim]`` in (f, h, w) row-major order."""
        return super().forward(x).flatten(2).transpose(1, 2).contiguous()


def unpatchify(x: Tensor, grid: Grid, patch: Grid, channels: int) -> Tensor:
    """Fold tokens back into a latent video, inverse of patchifying with channels last per patch.

    Args:
        x: Tokens ``[B, L, pt * ph * pw * C]``, each token's features ordered ``(pt, ph, pw, C)``.
        grid: Token grid ``(F, H, W)`` with ``L = F * H * W``.
        patch: Patch size ``(pt, ph, pw)``.
        channels: Latent channels ``C``.

    Returns:
        ``[B, C, F * pt, H * ph, W * pw]``.
    """
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(x.shape[0], channels, f * pt, h * ph, w * pw)


class TwoLayerMLP(nn.Module):
    """``linear_2(act(linear_1(x)))``: diffusers' ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``; WAN's
    and DiT's timestep and text embedders."""

    def __init__(self, in_dim: int, dim: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the two-layer MLP."""
        return self.linear_2(self.act(self.linear_1(x)))


# Initialisation --------------------------------------------------------------------------------


def draw_init(param: Tensor, init: Callable[[Tensor], object], generator: torch.Generator) -> None:
    """Run the random ``init`` (e.g. ``nn.init.xavier_uniform_(t, generator=g)``) for ``param``.

    A plain tensor on the generator's device is drawn in place. Otherwise the full-shape values are
    drawn into a plain tensor on the generator's device and copied over: a parameter on another device,
    or a tensor subclass such as a sharded (FSDP2/tensor-parallel) parameter, whose own in-place draw
    would not reproduce the plain one. So every layout gets the same weights from the same generator,
    and at most one full parameter exists at a time. (A subclass is detected by ``type``, so the domain
    needs no distributed import.)

    Args:
        param: Parameter to fill (its global shape for a sharded one).
        init: In-place initialiser of a plain tensor, drawing from ``generator``.
        generator: Random stream.
    """
    if type(param) in (Tensor, nn.Parameter) and param.device == generator.device:
        init(param)
        return
    tmp = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
    init(tmp)
    param.copy_(tmp)


def token_positions(
    latent_shape: tuple[int, ...],
    patch: tuple[int, int, int],
    head_dim: int,
    text_mask: Tensor | None,
    device: torch.device,
) -> tuple[tuple[Tensor, Tensor], Tensor | None, tuple[int, int, int]]:
    """What a transformer's blocks need besides tensors with gradients: RoPE tables, text key mask, grid.

    Args:
        latent_shape: ``[B, C, F, H, W]`` of the latents.
        patch: ``(pt, ph, pw)``.
        head_dim: Channels per attention head.
        text_mask: ``[B, S]`` (``True`` = real token), or ``None``.
        device: Where the tables go.

    Returns:
        ``((cos, sin) [L, head_dim] float32, mask [B, 1, 1, S] bool or None, grid (F', H', W'))``.
    """
    grid = patch_grid(*latent_shape[2:], patch)
    rope = rope_3d(head_dim, grid, device=device)
    mask = None if text_mask is None else text_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return rope, mask, grid


# Packed sequences ------------------------------------------------------------------------------


class PackedPositions(NamedTuple):
    """What blocks need to run on a packed sequence (:mod:`dfm.domain.packing`) besides tensors with gradients.

    Attention never crosses samples: self-attention runs per sample over ``segments``
    (:func:`~dfm.domain.networks.attention.segment_attention`) and ``text_mask`` lets each token see
    only its own sample's (real) text tokens. ``cu_seqlens``/``cu_seqlens_text`` describe the same blocks
    for a varlen kernel (flash-attention's ``cu_seqlens_q/k``; the text keys of sample ``i`` are its ``S``
    padded rows, so such a kernel must also honour ``text_mask`` or receive the text without padding).

    Attributes:
        layout: Per-sample grids and offsets.
        rope: ``(cos, sin)`` ``[sum L, head_dim]`` float32: each sample's own grid's table, concatenated.
        segments: Tokens per sample (host integers), the self-attention segments.
        text_mask: ``[1, 1, sum L, N * S]`` bool, ``True`` where the key is a real text token of the
            query's sample.
        lengths: ``[N]`` int64 tokens per sample, on the tokens' device (for :func:`per_token`).
        cu_seqlens: ``[N + 1]`` int32 cumulative video token counts.
        cu_seqlens_text: ``[N + 1]`` int32 cumulative (padded) text token counts, ``[0, S, 2S, ...]``.
    """

    layout: PackedLayout
    rope: tuple[Tensor, Tensor]
    segments: tuple[int, ...]
    text_mask: Tensor
    lengths: Tensor
    cu_seqlens: Tensor
    cu_seqlens_text: Tensor


def packed_positions(
    layout: PackedLayout, head_dim: int, text_mask: Tensor | None, text_len: int, device: torch.device
) -> PackedPositions:
    """RoPE tables, self-attention segments, the text mask and ``cu_seqlens`` of a packed sequence.

    Args:
        layout: The packed samples' grids.
        head_dim: Channels per attention head.
        text_mask: ``[N, S]`` bool (``True`` = real token), or ``None`` (every text token is real).
        text_len: ``S``, text tokens per sample (padded).
        device: Where the tables go.
    """
    tables = [rope_3d(head_dim, grid, device=device) for grid in layout.grids]
    rope = torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])
    ids = layout.segment_ids(device)
    text_ids = torch.arange(layout.num_samples, device=device).repeat_interleave(text_len)
    cross = ids[:, None] == text_ids[None, :]
    if text_mask is not None:
        cross = cross & text_mask.to(device=device, dtype=torch.bool).reshape(1, -1)
    lengths = torch.tensor(layout.lengths, device=device)
    cu_text = torch.arange(layout.num_samples + 1, device=device, dtype=torch.int32) * text_len
    segments = tuple(layout.lengths)
    return PackedPositions(layout, rope, segments, cross[None, None], lengths, layout.cu_seqlens(device), cu_text)


def per_token(values: Tensor, packed: PackedPositions) -> Tensor:
    """Broadcast per-sample values ``[N, ...]`` to the tokens of a packed sequence: ``[1, sum L, ...]``.

    Row ``i`` is repeated ``L_i`` times (its gradient sums over those tokens), so per-sample conditioning
    (timestep modulations, adaLN) reaches exactly its sample's tokens.
    """
    total = packed.layout.total_tokens
    return values.repeat_interleave(packed.lengths, dim=0, output_size=total).unsqueeze(0)


def check_packed_inputs(
    latents: Sequence[Tensor],
    timestep: Tensor,
    text: Tensor,
    text_mask: Tensor | None,
    *,
    in_channels: int,
    text_dim: int,
    patch: Grid,
) -> PackedLayout:
    """Validate a packed network call up front (DESIGN.md rule 7) and return its layout.

    Raises:
        ValueError: If the latents are not ``[C, F_i, H_i, W_i]`` with ``C = in_channels`` and sizes
            divisible by ``patch``, or ``timestep``, ``text``, ``text_mask`` are not ``[N]``,
            ``[N, S, text_dim]``, ``[N, S]``.
    """
    if not latents:
        raise ValueError("a packed forward needs at least one sample")
    for i, x in enumerate(latents):
        if x.ndim != 4 or x.shape[0] != in_channels:
            raise ValueError(f"packed latent {i} must be [{in_channels}, F, H, W], got {tuple(x.shape)}")
    n = len(latents)
    if tuple(timestep.shape) != (n,):
        raise ValueError(f"timestep must be [N]=[{n}] (one per packed sample), got {tuple(timestep.shape)}")
    if text.ndim != 3 or text.shape[0] != n or text.shape[2] != text_dim:
        raise ValueError(f"text must be [N, S, {text_dim}] with N={n}, got {tuple(text.shape)}")
    if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"text_mask must be [N, S]={tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
    return PackedLayout(grids=[patch_grid(*x.shape[1:], patch) for x in latents])


def unpatchify_packed(patches: Tensor, layout: PackedLayout, patch: Grid, channels: int) -> list[Tensor]:
    """Fold packed ``[1, sum L, pt * ph * pw * C]`` into per-sample ``[C, F_i, H_i, W_i]`` (:func:`unpatchify`)."""
    pieces = unpack_tokens(patches, layout)
    return [unpatchify(p.unsqueeze(0), g, patch, channels)[0] for p, g in zip(pieces, layout.grids, strict=True)]


def run_packed(
    network: Any, latents: Sequence[Tensor], timestep: Tensor, text: Tensor, text_mask: Tensor | None
) -> list[Tensor]:
    """A network's packed forward through its stages: ``embed_packed``, ``run_blocks``, ``project``, then
    :func:`unpatchify_packed` into per-sample outputs (shared by WAN and DiT)."""
    inputs = network.embed_packed(latents, timestep, text, text_mask)
    tokens = network.run_blocks(inputs.tokens, inputs)
    patches = network.project(tokens, inputs.temb, inputs.packed)
    return unpatchify_packed(patches, inputs.packed.layout, network.spec.patch_size, network.spec.out_channels)
