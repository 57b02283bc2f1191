"""Attention as a pluggable kernel (DESIGN.md rule 5).

A kernel maps ``q, k, v`` of shape ``[B, H, L, D]`` to the output ``[B, H, Lq, D]``. Networks call
whatever kernel they hold; runtimes may swap in a sequence-parallel kernel for the modules their
parallel plan allows.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS: dict[str, tuple[SDPBackend, ...]] = {
    "math": (SDPBackend.MATH,),
    "flash": (SDPBackend.FLASH_ATTENTION,),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
    "cudnn": (SDPBackend.CUDNN_ATTENTION,),
}
"""Backends selectable by name; ``"auto"`` lets torch choose (cuDNN first on Hopper when allowed)."""


class AttentionKernel(Protocol):
    """``(q, k, v, mask) -> out`` over ``[B, H, L, D]`` tensors."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class SDPAAttention:
    """``torch.nn.functional.scaled_dot_product_attention`` with an optional fixed backend.

    Args:
        backend: ``"auto"`` or one of :data:`SDPA_BACKENDS`.
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend != "auto" and backend not in SDPA_BACKENDS:
            raise ValueError(f"unknown SDPA backend {backend!r}; expected 'auto' or one of {sorted(SDPA_BACKENDS)}")
        self.backend = backend

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        ctx = contextlib.nullcontext() if self.backend == "auto" else sdpa_kernel(list(SDPA_BACKENDS[self.backend]))
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def __repr__(self) -> str:
        return f"SDPAAttention(backend={self.backend!r})"
