"""WAN 2.1 text-to-video and image-to-video transformer (Wan Team, "Wan: Open and Advanced Large-Scale Video
Generative Models", 2025).

Parameter names and shapes equal diffusers' ``WanTransformer3DModel`` (text-to-video, and image-to-video with
``image_dim``/``added_kv_proj_dim``: an image embedder for CLIP features and cross-attention keys and values of
the image tokens, attended beside the text's), so a diffusers state dict loads strictly into
:class:`WanTransformer` and back. The forward pass reproduces diffusers'
numerics, dtype casts included, with a pluggable attention kernel and an optional text mask.

Notation: ``B`` batch, ``L`` video tokens, ``S`` text tokens, ``h`` hidden size, ``H`` heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import attrs
import torch
from torch import Tensor, nn

from dfm.domain.networks.attention import AttentionKernel, SDPAAttention
from dfm.domain.networks.layers import (
    FP32LayerNorm,
    PackedPositions,
    PatchEmbed3d,
    check_packed_inputs,
    draw_init,
    gated_residual,
    norm_modulate,
    packed_positions,
    per_token,
    run_packed,
    token_positions,
    unpatchify,
)
from dfm.domain.networks.plan import ParallelPlan
from dfm.domain.networks.stages import TEXT_ROWS
from dfm.domain.networks.wan_layers import FeedForward, WanAttention, WanConditionEmbedder
from dfm.domain.specs import WanSpec

Rope = tuple[Tensor, Tensor]


class WanInputs(NamedTuple):
    """What the blocks consume, as :meth:`WanTransformer.embed` prepares it.

    Attributes:
        tokens: Patch-embedded video ``[B, L, h]``.
        context: Embedded text ``[B, S, h]``.
        modulation: Six modulations per sample ``[B, 6, h]`` (before each block's ``scale_shift_table``).
        temb: Timestep embedding ``[B, h]`` (for the output head).
        rope: ``(cos, sin)`` ``[L, D]`` float32.
        mask: Text key mask ``[B, 1, 1, S]`` bool, or ``None``.
        grid: Token grid ``(F, H, W)``.
        image: Embedded image features ``[B, R, h]`` of an image-to-video model, or ``None``.
    """

    tokens: Tensor
    context: Tensor
    modulation: Tensor
    temb: Tensor
    rope: Rope
    mask: Tensor | None
    grid: tuple[int, int, int]
    image: Tensor | None = None


class WanPackedInputs(NamedTuple):
    """What the blocks consume for a packed sequence (:meth:`WanTransformer.embed_packed`).

    Attributes:
        tokens: Patch-embedded video of all samples, concatenated ``[1, sum L, h]``.
        context: Embedded text of all samples, concatenated ``[1, N * S, h]``.
        modulation: Six modulations per sample ``[N, 6, h]`` (broadcast to each sample's tokens in the blocks).
        temb: Timestep embedding per sample ``[N, h]``.
        rope: ``(cos, sin)`` ``[sum L, D]``: each sample's own grid.
        mask: Cross-attention mask ``[1, 1, sum L, N * S]`` (own sample's real text only).
        packed: Layout, self-attention segments, text mask and ``cu_seqlens``.
    """

    tokens: Tensor
    context: Tensor
    modulation: Tensor
    temb: Tensor
    rope: Rope
    mask: Tensor
    packed: PackedPositions


WAN_PARALLEL_PLAN = ParallelPlan(
    blocks="blocks",
    column_parallel=(
        "blocks.*.attn1.to_q",
        "blocks.*.attn1.to_k",
        "blocks.*.attn1.to_v",
        "blocks.*.attn2.to_q",
        "blocks.*.attn2.to_k",
        "blocks.*.attn2.to_v",
        "blocks.*.ffn.net.0.proj",
    ),
    row_parallel=("blocks.*.attn1.to_out.0", "blocks.*.attn2.to_out.0", "blocks.*.ffn.net.2"),
    replicated=(
        "patch_embedding",
        "condition_embedder",
        "proj_out",
        "norm_out",
        "scale_shift_table",
        "blocks.*.scale_shift_table",
        "blocks.*.norm2",
    ),
    sequence_parallel_attention=("blocks.*.attn1",),
    head_norms=("blocks.*.attn1.norm_q", "blocks.*.attn1.norm_k", "blocks.*.attn2.norm_q", "blocks.*.attn2.norm_k"),
    first_stage=("patch_embedding", "condition_embedder"),
    last_stage=("norm_out", "proj_out", "scale_shift_table"),
    text_linears=("blocks.*.attn2.to_k", "blocks.*.attn2.to_v"),
    no_weight_decay=("scale_shift_table",),
)
"""Where :class:`WanTransformer` may be split (Megatron-style column/row pairs per attention and FFN)."""

WAN_I2V_PARALLEL_PLAN = attrs.evolve(
    WAN_PARALLEL_PLAN,
    column_parallel=(*WAN_PARALLEL_PLAN.column_parallel, "blocks.*.attn2.add_k_proj", "blocks.*.attn2.add_v_proj"),
    head_norms=(*WAN_PARALLEL_PLAN.head_norms, "blocks.*.attn2.norm_added_k"),
    text_linears=(*WAN_PARALLEL_PLAN.text_linears, "blocks.*.attn2.add_k_proj", "blocks.*.attn2.add_v_proj"),
)
"""The image-to-video network's plan: the image keys and values split like the text's."""


class WanBlock(nn.Module):
    """One WAN block: modulated self-attention with 3D RoPE, cross-attention to text, modulated FFN.

    The six modulations ``(shift, scale, gate)`` for attention and FFN are ``scale_shift_table + temb_proj``
    (adaLN, Peebles & Xie 2023); residual sums and norms run in float32 as in the reference.
    """

    def __init__(self, spec: WanSpec, kernel: AttentionKernel) -> None:
        super().__init__()
        dim, eps = spec.hidden_size, spec.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, spec.num_attention_heads, eps, kernel)
        self.attn2 = WanAttention(dim, spec.num_attention_heads, eps, kernel, spec.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if spec.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, spec.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        modulation: Tensor,
        rope: Rope,
        mask: Tensor | None,
        packed: PackedPositions | None = None,
        image: Tensor | None = None,
    ) -> Tensor:
        """Update video tokens ``x`` ``[B, L, h]`` given text ``context``, ``modulation`` ``[B, 6, h]``, RoPE, mask
        (and, image-to-video, the embedded ``image`` tokens cross-attention reads beside the text).

        With ``packed`` (a packed sequence, ``B = 1``), ``modulation`` is ``[N, 6, h]`` per sample and is
        broadcast to each sample's tokens, and self-attention is restricted to each sample's own tokens.
        """
        mods = (self.scale_shift_table + modulation.float()).chunk(6, dim=1)
        if packed is not None:
            mods = tuple(per_token(m[:, 0], packed) for m in mods)
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        segments = None if packed is None else packed.segments
        y = self.attn1(norm_modulate(self.norm1, x, shift, scale), rope=rope, segments=segments)
        x = gated_residual(x, y, gate)
        x = x + self.attn2(self.norm2(x), context, mask=mask, image=image)
        return gated_residual(x, self.ffn(norm_modulate(self.norm3, x, c_shift, c_scale)), c_gate)


class WanTransformer(nn.Module):
    """WAN 2.1 text-to-video diffusion transformer.

    Args:
        spec: Architecture.
        attention: Attention kernel shared by all attention modules (default: SDPA, backend ``"auto"``).
        generator: Generator for the initial weights (default: a fixed seed; no global RNG is drawn).
    """

    parallel_plan: ParallelPlan = WAN_PARALLEL_PLAN
    """Tensor/sequence/pipeline parallel plan (DESIGN.md rule 4)."""
    inputs_type = WanInputs
    """What :meth:`embed` returns (a pipeline runtime rebuilds it on later stages; :mod:`.stages`)."""
    carried: ClassVar[tuple[tuple[str, int | None], ...]] = (("context", TEXT_ROWS), ("modulation", 6), ("temb", 1))
    """What a pipeline stage hands on besides the tokens: embedded text, the six modulations, the timestep embedding."""
    fp32_modules: tuple[str, ...] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    """Parts whose parameters stay float32 when the network runs in a lower precision (a parameter whose dotted
    name holds one of these): the time embedding, the modulation tables and the block norms, as diffusers keeps
    them (``WanTransformer3DModel._keep_in_fp32_modules``); the forward computes them in float32 already."""

    def __init__(
        self, spec: WanSpec, *, attention: AttentionKernel | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # torch's default init must not consume the global RNG
            self._build(spec, attention)
        if not self.proj_out.weight.is_meta:
            self.init_weights(generator)

    def _build(self, spec: WanSpec, attention: AttentionKernel | None) -> None:
        if spec.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {spec.attention_head_dim}")
        kernel = SDPAAttention("auto") if attention is None else attention
        dim, patch = spec.hidden_size, spec.patch_size
        self.spec = spec
        self.patch_embedding = PatchEmbed3d(spec.in_channels, dim, patch)
        self.condition_embedder = WanConditionEmbedder(
            dim, spec.freq_dim, spec.text_dim, spec.image_dim, spec.pos_embed_seq_len
        )
        if spec.image_to_video:
            self.parallel_plan = WAN_I2V_PARALLEL_PLAN
        self.blocks = nn.ModuleList([WanBlock(spec, kernel) for _ in range(spec.num_layers)])
        self.norm_out = FP32LayerNorm(dim, spec.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, spec.out_channels * math.prod(patch))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        timestep: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        image: Tensor | None = None,
    ) -> Tensor | list[Tensor]:
        """Predict the flow-matching velocity (or whatever the weights were trained for).

        Args:
            x: Noisy latents ``[B, C, F, H, W]``; or a list of latents ``[C, F_i, H_i, W_i]`` of any
                shapes, run as one packed sequence (:meth:`forward_packed`, which then returns a list).
            timestep: ``[B]`` float timesteps (``sigma * 1000`` for flow matching).
            text: Text-encoder embeddings ``[B, S, text_dim]``.
            text_mask: Optional ``[B, S]`` bool, ``True`` for real tokens; masked tokens are ignored by
                cross-attention (a sample with no real token gets no text information). ``None`` attends
                to every token, as diffusers does.
            image: Image-to-video models: image-encoder features ``[B, R, image_dim]`` (CLIP's penultimate
                hidden states, ``R`` = 257; first-last-frame models: ``[2B, R, image_dim]``, each sample's first
                and last frame in turn, as diffusers takes them); text-to-video: ``None``.
                diffusers passes them as ``encoder_hidden_states_image``; the condition latents go in ``x``.

        Returns:
            ``[B, out_channels, F, H, W]``.
        """
        if isinstance(x, list | tuple):
            if image is not None:
                raise ValueError("packed sequences of an image-to-video model are not supported")
            return self.forward_packed(x, timestep, text, text_mask)
        inputs = self.embed(x, timestep, text, text_mask, image)
        tokens = self.run_blocks(inputs.tokens, inputs)
        return self.unpatchify(self.project(tokens, inputs.temb), inputs.grid)

    def forward_packed(
        self, latents: Sequence[Tensor], timestep: Tensor, text: Tensor, text_mask: Tensor | None = None
    ) -> list[Tensor]:
        """:meth:`forward` of ``N`` samples of different shapes, run as one packed token sequence.

        Tokens of all samples are concatenated; self-attention stays within each sample (one kernel call per
        sample, :func:`segment_attention`), each token attends only to its own sample's text, RoPE uses each
        sample's own grid and the timestep modulations of sample ``i`` reach only its tokens. Sample ``i``'s
        output equals ``forward(latents[i][None], timestep[i:i+1], text[i:i+1], text_mask[i:i+1])[0]`` up to
        float rounding.

        Args:
            latents: Noisy latents ``[C, F_i, H_i, W_i]``, one per sample.
            timestep: ``[N]`` float timesteps.
            text: Text embeddings ``[N, S, text_dim]`` (padded to a common ``S``).
            text_mask: Optional ``[N, S]`` bool, ``True`` for real tokens.

        Returns:
            Per-sample outputs ``[out_channels, F_i, H_i, W_i]``.
        """
        return run_packed(self, latents, timestep, text, text_mask)

    def embed_packed(
        self, latents: Sequence[Tensor], timestep: Tensor, text: Tensor, text_mask: Tensor | None = None
    ) -> WanPackedInputs:
        """:meth:`embed` for a packed sequence: per-sample patch embeddings concatenated, per-sample
        conditioning, RoPE of each sample's grid, the self-attention segments, text mask and ``cu_seqlens``."""
        s = self.spec
        if s.image_to_video:
            raise ValueError("packed sequences of an image-to-video model are not supported")
        layout = check_packed_inputs(
            latents, timestep, text, text_mask, in_channels=s.in_channels, text_dim=s.text_dim, patch=s.patch_size
        )
        device = latents[0].device
        latents = [self._input_dtypes(x, text)[0] for x in latents]
        text = self._input_dtypes(latents[0], text)[1]
        tokens = torch.cat([self.patch_embedding(x.unsqueeze(0)) for x in latents], dim=1)
        temb, modulation, context = self.condition_embedder(timestep, text)
        packed = packed_positions(layout, s.attention_head_dim, text_mask, text.shape[1], device)
        context = context.reshape(1, -1, context.shape[-1])
        return WanPackedInputs(tokens, context, modulation, temb, packed.rope, packed.text_mask, packed)

    def embed(
        self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None = None, image: Tensor | None = None
    ) -> WanInputs:
        """Everything before the blocks: patch embedding, conditioning, RoPE tables and the text mask.

        ``forward`` is ``embed``, :meth:`run_blocks`, :meth:`project`, :meth:`unpatchify`; pipeline and
        sequence-parallel runtimes call the stages themselves (a runtime that shards the tokens over ranks
        slices ``rope`` along ``L`` the same way and passes ``inputs._replace(rope=...)``).
        """
        self._check_inputs(x, timestep, text, text_mask, image)
        spec = self.spec
        rope, mask, grid = token_positions(x.shape, spec.patch_size, spec.attention_head_dim, text_mask, x.device)
        x, text = self._input_dtypes(x, text)
        temb, modulation, context = self.condition_embedder(timestep, text)
        embedded = None if image is None else self.condition_embedder.embed_image(image)
        return WanInputs(self.patch_embedding(x), context, modulation, temb, rope, mask, grid, embedded)

    def _input_dtypes(self, x: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and ``text`` in the dtype of the layers that read them (a network loaded in bf16 takes float32
        latents from a sampler, as diffusers' pipeline casts them to the transformer's dtype)."""
        return x.to(self.patch_embedding.weight.dtype), text.to(
            self.condition_embedder.text_embedder.linear_1.weight.dtype
        )

    def run_blocks(self, tokens: Tensor, inputs: WanInputs | WanPackedInputs) -> Tensor:
        """Every block on ``tokens`` ``[B, L, h]`` (``L`` may be a sequence shard matching ``inputs.rope``),
        or on a packed sequence ``[1, sum L, h]`` given :class:`WanPackedInputs`."""
        if isinstance(inputs, WanPackedInputs):
            for block in self.blocks:
                tokens = block(tokens, inputs.context, inputs.modulation, inputs.rope, inputs.mask, inputs.packed)
            return tokens
        for block in self.blocks:
            tokens = block(tokens, inputs.context, inputs.modulation, inputs.rope, inputs.mask, image=inputs.image)
        return tokens

    def project(self, tokens: Tensor, temb: Tensor, packed: PackedPositions | None = None) -> Tensor:
        """Every parameterised op after the blocks: modulated output norm and projection to patches.

        Works token by token, so a sequence-parallel runtime projects its shard and gathers afterwards.

        Args:
            tokens: ``[B, L, h]``.
            temb: Timestep embedding ``[B, h]`` (:attr:`WanInputs.temb`), or ``[N, h]`` for a packed sequence.
            packed: The packed sequence's positions (``tokens`` ``[1, sum L, h]``), or ``None``.

        Returns:
            ``[B, L, pt * ph * pw * out_channels]``.
        """
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        if packed is not None:
            shift, scale = per_token(shift[:, 0], packed), per_token(scale[:, 0], packed)
        return self.proj_out(norm_modulate(self.norm_out, tokens, shift, scale))

    def unpatchify(self, patches: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Fold :meth:`project`'s ``[B, L, pt * ph * pw * C]`` (all ``L`` tokens) into ``[B, C, F, H, W]``."""
        return unpatchify(patches, grid, self.spec.patch_size, self.spec.out_channels)

    def head(self, tokens: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Everything after the blocks: :meth:`unpatchify` of :meth:`project`."""
        return self.unpatchify(self.project(tokens, temb), grid)

    def _check_inputs(
        self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None, image: Tensor | None = None
    ) -> None:
        s = self.spec
        rows = 2 * x.shape[0] if s.pos_embed_seq_len is not None else x.shape[0]  # first-last-frame: 2 images each
        if s.image_to_video and (image is None or image.ndim != 3 or image.shape[0] != rows):
            got = None if image is None else tuple(image.shape)
            raise ValueError(f"this image-to-video model needs image features [{rows}, R, {s.image_dim}], got {got}")
        if image is not None and (not s.image_to_video or image.shape[2] != s.image_dim):
            raise ValueError(f"image features [B, R, {s.image_dim}] expected, got {tuple(image.shape)}")
        if x.ndim != 5 or x.shape[1] != s.in_channels:
            raise ValueError(f"x must be [B, {s.in_channels}, F, H, W], got {tuple(x.shape)}")
        if timestep.shape != (x.shape[0],):
            raise ValueError(f"timestep must be [B]=[{x.shape[0]}], got {tuple(timestep.shape)}")
        if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[2] != s.text_dim:
            raise ValueError(f"text must be [B, S, {s.text_dim}] with B={x.shape[0]}, got {tuple(text.shape)}")
        if text_mask is not None and text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask must be [B, S]={tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re-)initialise every parameter as the WAN reference does, drawing only from ``generator``.

        Linears: Xavier-uniform weights, zero biases; patch embedding Xavier-uniform over its flattened
        kernel; time and text embedders N(0, 0.02); scale-shift tables N(0, 1/h); output projection zero;
        norms to identity. Random values are drawn full-shape from ``generator`` in a fixed order, also
        for sharded (FSDP2/tensor-parallel) parameters, so every layout gets the same weights
        (:func:`~dfm.domain.networks.layers.draw_init`).
        """
        gen = torch.Generator().manual_seed(0) if generator is None else generator
        for m in self.modules():
            if isinstance(m, nn.Linear):
                draw_init(m.weight, lambda t: nn.init.xavier_uniform_(t, generator=gen), gen)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        draw_init(
            self.patch_embedding.weight, lambda t: nn.init.xavier_uniform_(t.view(t.shape[0], -1), generator=gen), gen
        )
        nn.init.zeros_(self.patch_embedding.bias)
        for mlp in (self.condition_embedder.time_embedder, self.condition_embedder.text_embedder):
            for lin in (mlp.linear_1, mlp.linear_2):
                draw_init(lin.weight, lambda t: nn.init.normal_(t, std=0.02, generator=gen), gen)
        tables = [self.scale_shift_table] + [b.scale_shift_table for b in self.blocks]
        for table in tables:
            draw_init(table, lambda t: nn.init.normal_(t, std=self.spec.hidden_size**-0.5, generator=gen), gen)
        nn.init.zeros_(self.proj_out.weight)
        embedder = getattr(self.condition_embedder, "image_embedder", None)
        if embedder is not None and embedder.pos_embed is not None:
            nn.init.zeros_(embedder.pos_embed)
