"""The layers of WAN 2.1's transformer (:mod:`dfm.domain.networks.wan`): attention with RMSNorm over all heads
(and, image-to-video, keys and values of the image tokens), the feed-forward network, and the timestep, text and
image conditioning; parameter names as diffusers' ``WanTransformer3DModel``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.domain.networks.attention import AttentionKernel, segment_attention
from dfm.domain.networks.layers import (
    FP32LayerNorm,
    RMSNorm,
    TwoLayerMLP,
    apply_rope,
    timestep_features,
)

Rope = tuple[Tensor, Tensor]


class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm over all heads on q and k, optional RoPE and key mask.

    Heads are recovered from the projection width with ``head_dim = dim // heads``, so a column-parallel
    shard of ``to_q/to_k/to_v`` (``dim / tp`` channels) simply holds ``heads / tp`` heads.

    Args:
        dim: Hidden size ``h``.
        heads: Number of heads ``H``.
        eps: RMSNorm epsilon.
        kernel: Attention kernel over ``[B, H, L, D]``; held in ``self.kernel`` so a runtime may swap it.
        added_kv_proj_dim: Width of image features given keys and values of their own (``add_k_proj``,
            ``add_v_proj``, ``norm_added_k``; image-to-video cross-attention); ``None``: none.
    """

    def __init__(
        self, dim: int, heads: int, eps: float, kernel: AttentionKernel, added_kv_proj_dim: int | None = None
    ) -> None:
        super().__init__()
        assert dim % heads == 0, f"hidden size {dim} is not a multiple of {heads} heads"
        self.head_dim = dim // heads
        self.kernel = kernel
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = RMSNorm(dim, eps=eps)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: Rope | None = None,
        mask: Tensor | None = None,
        segments: Sequence[int] | None = None,
        image: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``x`` ``[B, L, h]`` to ``context`` ``[B, S, h]`` (itself when ``None``).

        Args:
            x: Query tokens.
            context: Key/value tokens; ``None`` for self-attention.
            rope: ``(cos, sin)`` ``[L, D]`` applied to q and k (self-attention only).
            mask: Boolean key mask broadcastable to ``[B, H, L, S]``, ``True`` = attend. A query whose keys
                are all masked gets a zero attention output (attending to nothing), so its result is
                ``to_out``'s bias.
            segments: For self-attention over a packed sequence: tokens per sample; attention stays within
                each (:func:`segment_attention`).
            image: Image tokens ``[B, R, h]`` attended beside ``context`` through their own keys and values (all
                of them, unmasked): the two attention outputs are summed (image-to-video).
        """
        context = x if context is None else context
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(context)))
        v = self._heads(self.to_v(context))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if segments is not None:
            out = segment_attention(q, k, v, segments, self.kernel)
        elif mask is None:
            out = self.kernel(q, k, v)
        else:  # a query with no key to attend to gets a zero output (not the NaN of an all-masked softmax)
            has_keys = mask.any(dim=-1, keepdim=True)
            out = self.kernel(q, k, v, mask | ~has_keys) * has_keys
        out = out.transpose(1, 2).flatten(2).type_as(q)  # [B, H, L, D] -> [B, L, H*D]
        if image is not None:
            k_img = self._heads(self.norm_added_k(self.add_k_proj(image)))
            v_img = self._heads(self.add_v_proj(image))
            out = out + self.kernel(q, k_img, v_img).transpose(1, 2).flatten(2).type_as(q)
        return self.to_out[0](out)

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, L, H*D] -> [B, H, L, D]``, ``H`` from the width (fewer heads on a tensor-parallel shard)."""
        return x.unflatten(2, (-1, self.head_dim)).transpose(1, 2)


class FeedForward(nn.Module):
    """Position-wise FFN ``W2 gelu(W1 x)``, laid out as diffusers' ``FeedForward`` (``net.0.proj``, ``net.2``);
    tanh-approximated GELU in the blocks, the exact one in the image embedder."""

    def __init__(self, dim: int, ffn_dim: int, out_dim: int | None = None, approximate: str = "tanh") -> None:
        super().__init__()
        proj_in = nn.Module()
        proj_in.proj = nn.Linear(dim, ffn_dim)
        self.net = nn.ModuleList([proj_in, nn.Identity(), nn.Linear(ffn_dim, dim if out_dim is None else out_dim)])
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        """Apply the FFN to ``x`` ``[..., dim]``.

        Sampling on CUDA (eager or compiled) runs ``gelu_tanh(x W1^T + b1)`` as one GEMM with the bias and GELU in
        its epilogue (cuBLASLt's GELU is the tanh form), sparing a pass over the ``ffn_dim``-wide hidden activations.
        """
        proj = self.net[0].proj
        if self._gelu_epilogue(x, proj):
            hidden = torch._addmm_activation(proj.bias, x.flatten(0, -2), proj.weight.t(), use_gelu=True)
            return self.net[2](hidden.unflatten(0, x.shape[:-1]))
        return self.net[2](F.gelu(proj(x), approximate=self.approximate))

    def _gelu_epilogue(self, x: Tensor, proj: nn.Module) -> bool:
        """Whether the fused GEMM + GELU applies: a plain tensor (not a DTensor), no autograd, CUDA (torch's CPU
        kernel of the fused op computes the exact GELU instead), tanh GELU, and a plain ``nn.Linear`` with a bias and
        a plain weight (not LoRA, FP8 or a sharded DTensor). Eager and compiled alike: inductor calls the same
        cuBLASLt op (it has no lowering of its own), which made compiled sampling 2 % faster on an H100."""
        return (
            type(x) is Tensor
            and not torch.is_grad_enabled()
            and x.is_cuda
            and self.approximate == "tanh"
            and type(proj) is nn.Linear
            and proj.bias is not None
            and type(proj.weight) is nn.Parameter
            and x.dtype == proj.weight.dtype
        )


class WanImageEmbedder(nn.Module):
    """Image features into the hidden size: ``LN(W2 gelu(W1 LN(f)))``, laid out as diffusers' ``WanImageEmbedding``
    (``norm1``, ``ff.net.0.proj``, ``ff.net.2``, ``norm2``; ``pos_embed`` for first-last-frame models, added to the
    two images' features taken together)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        rows = pos_embed_seq_len
        self.pos_embed = None if rows is None else nn.Parameter(torch.zeros(1, rows, image_dim))

    def forward(self, image: Tensor) -> Tensor:
        """``[B, R, image_dim]`` features -> ``[B, R, h]`` tokens (first-last-frame: ``[2B, R, image_dim]``, each pair
        of images merged into ``2R`` tokens)."""
        if self.pos_embed is not None:
            image = image.view(-1, 2 * image.shape[1], image.shape[2]) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class WanConditionEmbedder(nn.Module):
    """Timestep, text and (image-to-video) image conditioning: ``temb = MLP(features(t))``, six modulations
    ``time_proj(silu(temb))``, the text projection ``MLP_gelu_tanh(text)`` into the hidden size, and the image
    features through :class:`WanImageEmbedder`."""

    def __init__(
        self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None = None, pos_embed_seq_len: int | None = None
    ) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TwoLayerMLP(freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TwoLayerMLP(text_dim, dim, nn.GELU(approximate="tanh"))
        if image_dim is not None:
            self.image_embedder = WanImageEmbedder(image_dim, dim, pos_embed_seq_len)

    def forward(self, timestep: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``temb`` ``[B, h]``, modulations ``[B, 6, h]`` and embedded text ``[B, S, h]``."""
        features = timestep_features(timestep, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        temb = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype)).type_as(text)
        modulation = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        return temb, modulation, self.text_embedder(text)

    def embed_image(self, image: Tensor) -> Tensor:
        """Image features ``[B, R, image_dim]`` as ``[B, R, h]`` tokens, in the embedder's dtype."""
        return self.image_embedder(image.to(self.image_embedder.norm1.weight.dtype))
