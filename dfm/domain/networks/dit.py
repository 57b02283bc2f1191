"""Video DiT for EDM (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

The DiT-XL/2 design carried over to video latents ``[B, C, F, H, W]``:

* Conv3d patch embedding with patch ``(1, 2, 2)``; tokens in (f, h, w) row-major order.
* Noise-level conditioning: sinusoidal features of EDM's ``c_noise = ln(sigma) / 4`` (Karras et al.,
  "Elucidating the Design Space of Diffusion-Based Generative Models", 2022) -> MLP -> ``c``.
* Blocks with adaLN-zero: ``Linear(SiLU(c))`` gives shift/scale/gate for self-attention and MLP,
  zero-initialised so each block starts as the identity.
* Self-attention with 3D RoPE (Su et al., "RoFormer", 2021) on q and k, computed from the actual
  token grid (no position table, so any latent size works) and per-head q/k RMSNorm (Dehghani et
  al., "Scaling Vision Transformers to 22 Billion Parameters", 2023).
* Cross-attention to the embedded text after a layer norm, as in PixArt-α (Chen et al., 2023): no
  RoPE, output projection zero-initialised, optional ``text_mask``.
* Final adaLN (shift, scale) + zero-initialised linear, unpatchified back to ``[B, C_out, F, H, W]``.

The network returns EDM's raw ``F_theta``; preconditioning lives in :mod:`dfm.domain.diffusion.edm`.
It is architecture only: :data:`DIT_PARALLEL_PLAN` says how runtimes may split it (DESIGN.md rule 4)
and every attention module holds a swappable kernel in ``kernel`` (rule 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.domain.networks.attention import AttentionKernel, SDPAAttention, segment_attention
from dfm.domain.networks.layers import (
    FP32LayerNorm,
    Grid,
    PackedPositions,
    PatchEmbed3d,
    RMSNorm,
    TwoLayerMLP,
    apply_rope,
    check_packed_inputs,
    draw_init,
    modulate,
    packed_positions,
    patch_grid,
    per_token,
    run_packed,
    timestep_features,
    token_positions,
    unpatchify,
)
from dfm.domain.networks.plan import ParallelPlan
from dfm.domain.networks.stages import TEXT_ROWS
from dfm.domain.specs import DiTSpec

Rope = tuple[Tensor, Tensor]
"""``(cos, sin)`` tables ``[L, head_dim]`` from :func:`~dfm.domain.networks.layers.rope_3d`."""


class DiTInputs(NamedTuple):
    """What the blocks consume, as :meth:`DiT.embed` prepares it (the fields WAN's ``WanInputs`` shares).

    Attributes:
        tokens: Patch-embedded video ``[B, L, h]``.
        context: Embedded text ``[B, S, h]``.
        temb: Noise-level embedding ``c`` ``[B, h]`` (for the blocks' and the output head's adaLN).
        rope: ``(cos, sin)`` ``[L, head_dim]`` float32.
        mask: Text key mask ``[B, 1, 1, S]`` bool, or ``None``.
        grid: Token grid ``(F, H, W)``.
    """

    tokens: Tensor
    context: Tensor
    temb: Tensor
    rope: Rope
    mask: Tensor | None
    grid: Grid


class DiTPackedInputs(NamedTuple):
    """What the blocks consume for a packed sequence (:meth:`DiT.embed_packed`).

    Attributes:
        tokens: Patch-embedded video of all samples, concatenated ``[1, sum L, h]``.
        context: Embedded text of all samples, concatenated ``[1, N * S, h]``.
        temb: Noise-level embedding per sample ``[N, h]`` (broadcast to each sample's tokens by the adaLN).
        rope: ``(cos, sin)`` ``[sum L, head_dim]``: each sample's own grid.
        mask: Cross-attention mask ``[1, 1, sum L, N * S]`` (own sample's real text only).
        packed: Layout, self-attention segments, text mask and ``cu_seqlens``.
    """

    tokens: Tensor
    context: Tensor
    temb: Tensor
    rope: Rope
    mask: Tensor
    packed: PackedPositions


DIT_PARALLEL_PLAN = ParallelPlan(
    blocks="blocks",
    column_parallel=(
        "blocks.*.self_attn.to_q",
        "blocks.*.self_attn.to_k",
        "blocks.*.self_attn.to_v",
        "blocks.*.cross_attn.to_q",
        "blocks.*.cross_attn.to_k",
        "blocks.*.cross_attn.to_v",
        "blocks.*.mlp.fc1",
    ),
    row_parallel=("blocks.*.self_attn.to_out", "blocks.*.cross_attn.to_out", "blocks.*.mlp.fc2"),
    replicated=("patch_embedding", "time_embedder", "text_embedder", "blocks.*.modulation", "final_layer"),
    sequence_parallel_attention=("blocks.*.self_attn",),
    first_stage=("patch_embedding", "time_embedder", "text_embedder"),
    last_stage=("final_layer",),
    text_linears=("blocks.*.cross_attn.to_k", "blocks.*.cross_attn.to_v"),
)
"""How :class:`DiT` may be split. q/k norms are per head, so tensor parallelism needs no ``head_norms``."""


class Attention(nn.Module):
    """Multi-head attention with per-head q/k RMSNorm, optional RoPE and a pluggable kernel.

    Heads are recovered from the projection width with ``head_dim``, so a column-parallel shard of
    ``to_q/to_k/to_v`` simply holds fewer heads.

    Args:
        dim: Model width ``h`` (queries, keys and values all have width ``h``).
        head_dim: Channels per head ``D``.
        eps: RMSNorm epsilon.
        kernel: Attention kernel over ``[B, H, L, D]``, kept in :attr:`kernel` so runtimes can swap it.
    """

    def __init__(self, dim: int, head_dim: int, eps: float, kernel: AttentionKernel) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.kernel = kernel

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: Rope | None = None,
        mask: Tensor | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        """Attend from ``x`` ``[B, L, h]`` to ``context`` ``[B, S, h]`` (``x`` itself when ``None``).

        Args:
            x: Query tokens.
            context: Key/value tokens; ``None`` for self-attention.
            rope: RoPE tables applied to q and k (self-attention only: q and k share positions).
            mask: Boolean ``[B, 1, 1 | L, S]``, ``True`` = attend. A query whose keys are all masked
                gets a zero output (attending to nothing), not NaN.
            segments: For self-attention over a packed sequence: tokens per sample; attention stays within
                each (:func:`segment_attention`).

        Returns:
            ``[B, L, h]``.
        """
        context = x if context is None else context
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(context)))
        v = self._heads(self.to_v(context))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keep = None
        if mask is not None:
            keep = mask.any(dim=-1, keepdim=True)
            mask = mask | ~keep
        if segments is not None:
            attended = segment_attention(q, k, v, segments, self.kernel)
        else:
            attended = self.kernel(q, k, v, mask)
        out = self.to_out(attended.transpose(1, 2).flatten(2))
        return out if keep is None else out * keep[:, 0].to(out.dtype)

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, L, H * D]`` -> ``[B, H, L, D]``."""
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)


class MLP(nn.Module):
    """Transformer MLP ``fc2(GELU_tanh(fc1(x)))`` (DiT's ``Mlp``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to ``x`` ``[..., dim]``."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-zero block (Peebles & Xie, 2023) with cross-attention to text (PixArt-α, Chen et al., 2023).

    ``x += gate_msa * SelfAttn(modulate(norm1(x)))``; ``x += CrossAttn(norm2(x), text)``;
    ``x += gate_mlp * MLP(modulate(norm3(x)))``. With the modulation and the cross-attention output
    projection zero-initialised the block is the identity.

    Args:
        spec: Model spec.
        kernel: Attention kernel shared by both attention modules.
    """

    def __init__(self, spec: DiTSpec, kernel: AttentionKernel) -> None:
        super().__init__()
        h, d, eps = spec.hidden_size, spec.attention_head_dim, spec.eps
        self.norm1 = FP32LayerNorm(h, eps=eps, elementwise_affine=False)
        self.self_attn = Attention(h, d, eps, kernel)
        self.norm2 = FP32LayerNorm(h, eps=eps, elementwise_affine=True)
        self.cross_attn = Attention(h, d, eps, kernel)
        self.norm3 = FP32LayerNorm(h, eps=eps, elementwise_affine=False)
        self.mlp = MLP(h, spec.ffn_dim)
        self.modulation = nn.Linear(h, 6 * h)

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        context: Tensor,
        rope: Rope,
        text_mask: Tensor | None = None,
        packed: PackedPositions | None = None,
    ) -> Tensor:
        """Run the block.

        Args:
            x: Video tokens ``[B, L, h]``.
            c: Noise-level embedding ``[B, h]``.
            context: Embedded text ``[B, S, h]``.
            rope: RoPE tables of the video tokens.
            text_mask: Boolean ``[B, 1, 1, S]`` attention mask over the text, or ``None``.
            packed: For a packed sequence (``x`` ``[1, sum L, h]``, ``c`` ``[N, h]``, ``context``
                ``[1, N * S, h]``, ``text_mask`` ``[1, 1, sum L, N * S]``): its positions; each sample's
                adaLN reaches only its tokens and self-attention stays within each sample.

        Returns:
            ``[B, L, h]``.
        """
        mods = self.modulation(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        if packed is not None:
            mods = tuple(per_token(m[:, 0], packed) for m in mods)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        segments = None if packed is None else packed.segments
        x = x + gate_msa * self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope, segments=segments)
        x = x + self.cross_attn(self.norm2(x), context, mask=text_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """DiT's output head: adaLN (shift, scale) then a linear to ``out_channels * patch volume``."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: Tensor, c: Tensor, packed: PackedPositions | None = None) -> Tensor:
        """Map tokens ``[B, L, h]`` under conditioning ``c`` ``[B, h]`` to ``[B, L, out_features]``
        (a packed sequence ``[1, sum L, h]`` with ``c`` ``[N, h]`` given its ``packed`` positions)."""
        shift, scale = self.modulation(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        if packed is not None:
            shift, scale = per_token(shift[:, 0], packed), per_token(scale[:, 0], packed)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Video diffusion transformer for EDM (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

    See the module docstring for the architecture. Inputs are cast to the parameters' dtype, so an
    fp32 latent can drive a bf16 model.

    Args:
        spec: Model sizes.
        attention: Attention kernel for every attention module (default ``SDPAAttention("auto")``).
        generator: Random stream for the initial weights (default: a fixed seed; the global RNG is never
            drawn). On the meta device nothing is initialised: call :meth:`init_weights` after materialising.

    Attributes:
        parallel_plan: Where runtimes may split this network (:data:`DIT_PARALLEL_PLAN`).
    """

    parallel_plan: ClassVar[ParallelPlan] = DIT_PARALLEL_PLAN
    inputs_type: ClassVar[type] = DiTInputs
    """What :meth:`embed` returns (a pipeline runtime rebuilds it on later stages; :mod:`.stages`)."""
    carried: ClassVar[tuple[tuple[str, int | None], ...]] = (("context", TEXT_ROWS), ("temb", 1))
    """What a pipeline stage hands on besides the tokens: the embedded text and the noise-level embedding."""
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    """Parts whose parameters stay float32 when the network runs in a lower precision: none (its norms compute
    in float32 already, and every other layer takes the dtype of the layer before)."""

    def __init__(
        self, spec: DiTSpec, *, attention: AttentionKernel | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if spec.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {spec.attention_head_dim}")
        with torch.random.fork_rng(devices=[]):  # torch's default init must not consume the global RNG
            self._build(spec, SDPAAttention("auto") if attention is None else attention)
        if not self.final_layer.linear.weight.is_meta:
            self.init_weights(generator)

    def _build(self, spec: DiTSpec, kernel: AttentionKernel) -> None:
        h, patch_volume = spec.hidden_size, math.prod(spec.patch_size)
        self.spec = spec
        self.patch_embedding = PatchEmbed3d(spec.in_channels, h, spec.patch_size)
        self.time_embedder = TwoLayerMLP(spec.freq_dim, h, nn.SiLU())
        self.text_embedder = TwoLayerMLP(spec.text_dim, h, nn.GELU(approximate="tanh"))
        self.blocks = nn.ModuleList(DiTBlock(spec, kernel) for _ in range(spec.num_layers))
        self.final_layer = FinalLayer(h, spec.out_channels * patch_volume, spec.eps)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """DiT's initialisation (plus PixArt-α's zero cross-attention output).

        Xavier-uniform linears and patch embedding with zero biases; N(0, 0.02) conditioning MLPs;
        zero adaLN modulations, cross-attention output projections and final linear, so the network
        starts as the identity on its tokens and outputs zero. Runtimes that build on the meta device
        call this after materialising the parameters.

        Args:
            generator: Random stream (default: a fixed seed; the global RNG is never drawn). Values are
                drawn full-shape on its device and copied to the parameters' device or shards
                (:func:`~dfm.domain.networks.layers.draw_init`), so every parallel layout gets the same weights.
        """
        gen = torch.Generator().manual_seed(0) if generator is None else generator
        for module in self.modules():
            if isinstance(module, nn.Linear):
                draw_init(module.weight, lambda t: nn.init.xavier_uniform_(t, generator=gen), gen)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()
        xavier_flat = lambda t: nn.init.xavier_uniform_(t.view(t.shape[0], -1), generator=gen)
        draw_init(self.patch_embedding.weight, xavier_flat, gen)
        nn.init.zeros_(self.patch_embedding.bias)
        for embedder in (self.time_embedder, self.text_embedder):
            for linear in (embedder.linear_1, embedder.linear_2):
                draw_init(linear.weight, lambda t: nn.init.normal_(t, std=0.02, generator=gen), gen)
        zero = [self.final_layer.modulation, self.final_layer.linear]
        zero += [m for block in self.blocks for m in (block.modulation, block.cross_attn.to_out)]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, x: Tensor | Sequence[Tensor], timestep: Tensor, text: Tensor, text_mask: Tensor | None = None
    ) -> Tensor | list[Tensor]:
        """EDM's raw network output ``F_theta(c_in x, c_noise)``.

        Args:
            x: Latents ``[B, C_in, F, H, W]`` (already scaled by ``c_in``); ``F, H, W`` divisible by the patch.
                A list of latents ``[C_in, F_i, H_i, W_i]`` of any shapes runs as one packed sequence
                (:meth:`forward_packed`, which then returns a list).
            timestep: EDM's ``c_noise = ln(sigma) / 4`` per sample, ``[B]``.
            text: Text embeddings ``[B, S, text_dim]``.
            text_mask: Boolean ``[B, S]``, ``True`` for real tokens; masked tokens are ignored exactly as
                if dropped. A sample with no real token gets no text conditioning.

        Returns:
            ``[B, C_out, F, H, W]`` in the parameters' dtype.
        """
        if isinstance(x, list | tuple):
            return self.forward_packed(x, timestep, text, text_mask)
        inputs = self.embed(x, timestep, text, text_mask)
        tokens = self.run_blocks(inputs.tokens, inputs)
        return self.unpatchify(self.project(tokens, inputs.temb), inputs.grid)

    def forward_packed(
        self, latents: Sequence[Tensor], timestep: Tensor, text: Tensor, text_mask: Tensor | None = None
    ) -> list[Tensor]:
        """:meth:`forward` of ``N`` samples of different shapes, run as one packed token sequence.

        Tokens of all samples are concatenated; self-attention stays within each sample (one kernel call per
        sample, :func:`segment_attention`), each token attends only to its own sample's text, RoPE uses each
        sample's own grid and each sample's adaLN modulation reaches only its tokens. Sample ``i``'s output
        equals ``forward(latents[i][None], timestep[i:i+1], text[i:i+1], text_mask[i:i+1])[0]`` up to float rounding.

        Args:
            latents: Latents ``[C_in, F_i, H_i, W_i]``, one per sample.
            timestep: ``c_noise`` per sample, ``[N]``.
            text: Text embeddings ``[N, S, text_dim]`` (padded to a common ``S``).
            text_mask: Optional ``[N, S]`` bool, ``True`` for real tokens.

        Returns:
            Per-sample outputs ``[C_out, F_i, H_i, W_i]``.
        """
        return run_packed(self, latents, timestep, text, text_mask)

    def embed_packed(
        self, latents: Sequence[Tensor], timestep: Tensor, text: Tensor, text_mask: Tensor | None = None
    ) -> DiTPackedInputs:
        """:meth:`embed` for a packed sequence: per-sample patch embeddings concatenated, per-sample noise
        embeddings, RoPE of each sample's grid, the self-attention segments, text mask and ``cu_seqlens``."""
        s = self.spec
        layout = check_packed_inputs(
            latents, timestep, text, text_mask, in_channels=s.in_channels, text_dim=s.text_dim, patch=s.patch_size
        )
        dtype, device = self.patch_embedding.weight.dtype, latents[0].device
        tokens = torch.cat([self.patch_embedding(x.unsqueeze(0).to(dtype)) for x in latents], dim=1)
        c = self.embed_noise(timestep)
        context = self.text_embedder(text.to(dtype))
        packed = packed_positions(layout, s.attention_head_dim, text_mask, text.shape[1], device)
        context = context.reshape(1, -1, context.shape[-1])
        return DiTPackedInputs(tokens, context, c, packed.rope, packed.text_mask, packed)

    def embed(self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None = None) -> DiTInputs:
        """Everything before the blocks: patch embedding, noise and text embeddings, RoPE tables, text mask.

        ``forward`` is ``embed``, :meth:`run_blocks`, :meth:`project`, :meth:`unpatchify` (the stages of
        ``WanTransformer``); sequence-parallel runtimes call them themselves, slicing ``rope`` along ``L``
        like the tokens and passing ``inputs._replace(rope=...)``. Arguments as in :meth:`forward`.
        """
        grid = self._check_inputs(x, timestep, text, text_mask)
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype))
        c = self.embed_noise(timestep)
        context = self.text_embedder(text.to(dtype))
        spec = self.spec
        rope, mask, _ = token_positions(x.shape, spec.patch_size, spec.attention_head_dim, text_mask, x.device)
        return DiTInputs(tokens, context, c, rope, mask, grid)

    def run_blocks(self, tokens: Tensor, inputs: DiTInputs | DiTPackedInputs) -> Tensor:
        """Every block on ``tokens`` ``[B, L, h]`` (``L`` may be a sequence shard matching ``inputs.rope``),
        or on a packed sequence ``[1, sum L, h]`` given :class:`DiTPackedInputs`."""
        if isinstance(inputs, DiTPackedInputs):
            for block in self.blocks:
                tokens = block(tokens, inputs.temb, inputs.context, inputs.rope, inputs.mask, inputs.packed)
            return tokens
        for block in self.blocks:
            tokens = block(tokens, inputs.temb, inputs.context, inputs.rope, inputs.mask)
        return tokens

    def project(self, tokens: Tensor, temb: Tensor, packed: PackedPositions | None = None) -> Tensor:
        """The output head's adaLN and linear, token by token: ``[B, L, h]`` -> ``[B, L, pt * ph * pw * C_out]``.

        Args:
            tokens: Block outputs (all tokens or a sequence shard).
            temb: Noise-level embedding ``[B, h]`` (:attr:`DiTInputs.temb`), or ``[N, h]`` for a packed sequence.
            packed: The packed sequence's positions (``tokens`` ``[1, sum L, h]``), or ``None``.
        """
        if packed is None:
            return self.final_layer(tokens, temb)
        return self.final_layer(tokens, temb, packed)

    def unpatchify(self, patches: Tensor, grid: Grid) -> Tensor:
        """Fold :meth:`project`'s ``[B, L, pt * ph * pw * C_out]`` (all ``L`` tokens) into ``[B, C_out, F, H, W]``."""
        return unpatchify(patches, grid, self.spec.patch_size, self.spec.out_channels)

    def embed_noise(self, timestep: Tensor) -> Tensor:
        """Noise-level embedding ``c`` ``[B, h]`` of ``c_noise`` ``[B]``."""
        features = timestep_features(timestep, self.spec.freq_dim)
        return self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype))

    def _check_inputs(self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None) -> Grid:
        """Validate shapes up front (DESIGN.md rule 7) and return the token grid."""
        spec = self.spec
        if x.ndim != 5 or x.shape[1] != spec.in_channels:
            raise ValueError(f"x must be [B, {spec.in_channels}, F, H, W], got {tuple(x.shape)}")
        batch = x.shape[0]
        if tuple(timestep.shape) != (batch,):
            raise ValueError(f"timestep must be [B]=[{batch}] (one c_noise per sample), got {tuple(timestep.shape)}")
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != spec.text_dim:
            raise ValueError(f"text must be [{batch}, S, {spec.text_dim}], got {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be [B, S]={tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        return patch_grid(x.shape[2], x.shape[3], x.shape[4], spec.patch_size)


def dit_num_params(spec: DiTSpec) -> int:
    """Closed-form parameter count of :class:`DiT` built from ``spec``.

    Per block: four ``h x h`` projections (with bias) in each attention, two per-head RMSNorm weights
    in each, the cross-attention layer norm, the MLP and the ``h -> 6h`` modulation.
    """
    h, d, ffn = spec.hidden_size, spec.attention_head_dim, spec.ffn_dim
    patch_volume = math.prod(spec.patch_size)
    attention = 4 * (h * h + h) + 2 * d
    block = 2 * attention + 2 * h + (h * ffn + ffn + ffn * h + h) + (h * 6 * h + 6 * h)
    embed = spec.in_channels * patch_volume * h + h  # patch embedding
    embed += (spec.freq_dim * h + h) + (h * h + h)  # noise-level MLP
    embed += (spec.text_dim * h + h) + (h * h + h)  # text MLP
    head = (h * 2 * h + 2 * h) + (h * spec.out_channels * patch_volume + spec.out_channels * patch_volume)
    return spec.num_layers * block + embed + head
