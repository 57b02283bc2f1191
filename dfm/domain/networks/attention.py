"""Attention as a pluggable kernel (DESIGN.md rule 5).

A kernel maps ``q, k, v`` of shape ``[B, H, L, D]`` to the output ``[B, H, Lq, D]``. Networks call
whatever kernel they hold; runtimes may swap in a sequence-parallel kernel for the modules their
parallel plan allows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS: dict[str, tuple[SDPBackend, ...]] = {
    "math": (SDPBackend.MATH,),
    "flash": (SDPBackend.FLASH_ATTENTION,),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
    "cudnn": (SDPBackend.CUDNN_ATTENTION,),
    "fa4": (SDPBackend.FLASH_ATTENTION,),
}
"""Backends selectable by name (only that one runs; a call it cannot serve fails). ``"fa4"`` is torch's flash
backend with FlashAttention-4 (the ``flash-attn-4`` package, CUDA compute capability 9.x or 10.x) in its place;
the composition root activates it (``dfm.adapters.kernels``) before any kernel is built."""

ATTENTION_BACKENDS: tuple[str, ...] = ("auto", *SDPA_BACKENDS)
"""Every name :class:`SDPAAttention` takes: the choices of ``train.attention_backend`` and ``--attention``."""


def flash_attention_4_active() -> bool:
    """Whether torch's flash SDPA backend runs FlashAttention-4 in this process (torch >= 2.10's registry)."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    return current is not None and current() == "FA4"


AUTO_CUDA_PRIORITY: tuple[SDPBackend, ...] = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
"""``"auto"`` on CUDA: the first of these that serves the call. torch's own order puts flash first; cuDNN's
kernel is ~1.7x faster on Hopper (598 vs 355 TFLOP/s forward at 32,760 tokens, 12 heads x 128, one H100) and
torch skips it where the hardware, dtype or shape does not suit it. On CPU ``"auto"`` is torch's choice."""


class AttentionKernel(Protocol):
    """``(q, k, v, mask) -> out`` over ``[B, H, L, D]`` tensors."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class SDPAAttention:
    """``torch.nn.functional.scaled_dot_product_attention`` with an optional fixed backend.

    Args:
        backend: ``"auto"`` (on CUDA: :data:`AUTO_CUDA_PRIORITY`; elsewhere torch's choice) or one of
            :data:`SDPA_BACKENDS` (``"fa4"``: FlashAttention-4 must be active, see :data:`SDPA_BACKENDS`).

    Raises:
        ValueError: an unknown backend, or ``"fa4"`` while FlashAttention-4 is not active.
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown SDPA backend {backend!r}; expected 'auto' or one of {sorted(SDPA_BACKENDS)}")
        if backend == "fa4" and not flash_attention_4_active():
            raise ValueError(
                "attention backend 'fa4': FlashAttention-4 is not active in this process (dfm's commands activate it "
                "when train.attention_backend or --attention names fa4; in your own code call "
                "dfm.adapters.kernels.activate_flash_attention_4() first)"
            )
        self.backend = backend

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.backend != "auto":
            ctx = sdpa_kernel(list(SDPA_BACKENDS[self.backend]))
        elif q.is_cuda:
            ctx = sdpa_kernel(list(AUTO_CUDA_PRIORITY), set_priority=True)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def __repr__(self) -> str:
        return f"SDPAAttention(backend={self.backend!r})"


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], kernel: AttentionKernel
) -> torch.Tensor:
    """Self-attention of a packed sequence within each sample: one ``kernel`` call per segment.

    Segment ``i`` is the ``lengths[i]`` rows after the previous ones, for queries and keys alike. Each call is
    an ordinary unmasked attention, so it runs on the fast kernels (cuDNN, flash), and nothing of size
    ``(sum L)^2`` is ever built, where a block-diagonal mask over the whole sequence would push SDPA onto a
    masked kernel. ``lengths`` are host integers (no device sync). Equal to :func:`varlen_attention` with
    ``cu_seqlens`` the running sums of ``lengths``.

    Args:
        q, k, v: Packed ``[B, H, sum L, D]``.
        lengths: Tokens per sample.
        kernel: The attention kernel.
    """
    if len(lengths) == 1:
        return kernel(q, k, v)
    sizes = list(lengths)
    parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2), strict=True)
    return torch.cat([kernel(qi, ki, vi) for qi, ki, vi in parts], dim=2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    kernel: AttentionKernel | None = None,
) -> torch.Tensor:
    """Variable-length attention over packed sequences, segment by segment: the reference semantics.

    Query segment ``i`` (rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``) attends only to key segment ``i``,
    as flash-attention's ``flash_attn_varlen_func`` does; equal to ``kernel`` with the block-diagonal
    mask of :meth:`~dfm.domain.packing.PackedLayout.block_mask`. A fused varlen kernel taking the same
    ``cu_seqlens`` must reproduce this.

    Args:
        q: Packed queries ``[1, H, sum Lq, D]``.
        k: Packed keys ``[1, H, sum Lk, D]``.
        v: Packed values ``[1, H, sum Lk, D]``.
        cu_seqlens_q: ``[N + 1]`` int32 cumulative query lengths.
        cu_seqlens_k: ``[N + 1]`` int32 cumulative key lengths.
        kernel: The per-segment kernel (default: SDPA, backend ``"auto"``).

    Returns:
        ``[1, H, sum Lq, D]``.
    """
    kernel = SDPAAttention() if kernel is None else kernel
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(bounds_q) == len(bounds_k), "cu_seqlens_q and cu_seqlens_k must describe the same segments"
    pieces = [
        kernel(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1])
        for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:], strict=True)
    ]
    return torch.cat(pieces, dim=2)
