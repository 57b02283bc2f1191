"""Test-only patches that let megatron-core 0.16 run on CPU with gloo (see ../shared/notes/dependencies.md).

Megatron hard-codes CUDA in a few places its CPU-capable paths go through: ``torch.cuda.current_device()``
(buffers, RoPE), ``torch.cuda.synchronize()`` (dist_checkpointing), and ``device="cuda"`` literals in the
pipeline schedules, the optimizers, gradient clipping and the gradient buffers, and the distributed
optimizer's check that parameters are ``torch.cuda.*Tensor``. :func:`patch_megatron_for_cpu`
points all of them at the CPU. It lives in tests/ only: ``dfm`` itself runs megatron on CUDA as megatron
intends, and on CPU only through this patch.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


def _cpu(device: Any) -> Any:
    return "cpu" if device is not None and str(device).startswith("cuda") else device


class _CpuTorch:
    """``torch`` as these modules see it: tensor factories put ``device="cuda"`` tensors on the CPU."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
            return attr(*args, device=_cpu(device), **kwargs)

        return factory


def _cuda_type_names(type_fn: Any) -> Any:
    """``tensor.type()`` naming CPU tensors as CUDA ones (``torch.cuda.FloatTensor``); other calls unchanged."""

    def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = type_fn(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or not name.startswith("torch.") or "cuda" in name:
            return name
        return "torch.cuda." + name.removeprefix("torch.")

    type_name._dfm_cpu = True  # type: ignore[attr-defined]
    return type_name


def patch_megatron_for_cpu() -> None:
    """Apply the patches in this process (idempotent; call before building megatron objects)."""
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    if not getattr(torch.Tensor.type, "_dfm_cpu", False):  # the distributed optimizer checks type() names
        torch.Tensor.type = _cuda_type_names(torch.Tensor.type)  # type: ignore[method-assign]
    proxy = _CpuTorch()
    for name in _MODULES:
        importlib.import_module(name).torch = proxy
