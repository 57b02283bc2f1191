"""FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL) as torch's flash SDPA backend.

torch (>= 2.10) can put FA4 behind ``SDPBackend.FLASH_ATTENTION`` itself: its registry
(``torch.nn.attention.activate_flash_attention_impl("FA4")``) registers CUDA kernels for the flash ops that call
the module's ``_flash_attn_fwd`` and ``_flash_attn_bwd``, so eager code, autograd and ``torch.compile`` (which
keeps the op as an extern call) all run it. torch expects ``_flash_attn_fwd`` to return ``(out, lse)``; newer FA4
releases return more (those after ``4.0.0b17``: the softmax probabilities and row maxima where asked), so this
module is the one torch is pointed at: it forwards to ``flash_attn.cute.interface`` and keeps torch's contract.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
import torch.nn.attention as torch_attention

FA4_HINT = (
    "attention backend 'fa4' runs FlashAttention-4 through torch's flash-attention registry (torch >= 2.10) and "
    "needs the flash-attn-4 package: pip install flash-attn-4 (CUDA 13: 'flash-attn-4[cu13]'); or choose cudnn"
)
"""What to do when FlashAttention-4 cannot be activated."""


@functools.cache
def _interface() -> ModuleType:
    return importlib.import_module("flash_attn.cute.interface")


def dense_strides(t: Any) -> Any:
    """``t`` itself, or the same memory viewed without zero strides on its size-1 dimensions.

    A size-1 dimension may carry any stride (compiled graphs often give it 0, and torch's FA4 registration
    allocates its output with ``empty_like(query)``, which copies them); FA4 refuses zero strides on the tensors it
    writes. Any stride addresses the same elements there, so a view with the largest extent in its place is the same
    tensor to FA4.
    """
    if not isinstance(t, torch.Tensor) or all(s or n != 1 for s, n in zip(t.stride(), t.shape, strict=True)):
        return t
    span = max((s * n for s, n in zip(t.stride(), t.shape, strict=True)), default=1) or 1
    return t.as_strided(t.shape, [s if s or n != 1 else span for s, n in zip(t.stride(), t.shape, strict=True)])


def _flash_attn_fwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's forward, returning ``(out, lse)`` as torch's FA4 registration unpacks it."""
    args, kwargs = [dense_strides(a) for a in args], {k: dense_strides(v) for k, v in kwargs.items()}
    out, lse = _interface()._flash_attn_fwd(*args, **kwargs)[:2]
    return out, lse


def _flash_attn_bwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's backward, returning ``(dq, dk, dv)``."""
    args, kwargs = [dense_strides(a) for a in args], {k: dense_strides(v) for k, v in kwargs.items()}
    dq, dk, dv = _interface()._flash_attn_bwd(*args, **kwargs)[:3]
    return dq, dk, dv


@functools.cache
def activate_flash_attention_4() -> None:
    """Put FlashAttention-4 behind torch's flash SDPA backend, once per process.

    From then on every ``SDPBackend.FLASH_ATTENTION`` call on a CUDA tensor runs FA4, and ``SDPAAttention("fa4")``
    can be built. A CUDA call FA4 cannot serve (another GPU than Hopper or Blackwell, dropout) fails with torch's
    "FA4 ... unsupported" error; CPU tensors keep torch's CPU kernel.

    Raises:
        ValueError: torch has no FA4 registration, or ``flash-attn-4`` is missing or broken (:data:`FA4_HINT`).
    """
    register = getattr(torch_attention, "register_flash_attention_impl", None)
    try:
        from torch.nn.attention._fa4 import register_flash_attention_fa4
    except ImportError:
        register = None
    if register is None:
        raise ValueError(f"{FA4_HINT} (torch {torch.__version__} has no FA4 registration)")
    try:
        _interface()
    except ImportError as err:
        raise ValueError(f"{FA4_HINT} ({type(err).__name__}: {err})") from err
    register("FA4", register_fn=functools.partial(register_flash_attention_fa4, module_path=__name__))
    torch_attention.activate_flash_attention_impl("FA4")
