"""Gradient reductions, norms and clipping of a network sharded with FSDP2 (and DTensor TP).

A rank's loss is ``sum(per_sample) / global_batch_size`` over its own samples, so the true gradient
is the SUM over the data-parallel and context-parallel ranks: every FSDP module reduces with a divide
factor of 1 and plain sum collectives (a custom factor alone would use ``PREMUL_SUM``, which gloo
lacks). The gradient norm is taken per device mesh (a ``DTensor`` norm over parameters on different
meshes fails), each group's norm made whole, and the groups combined: identical on every rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def use_sum_reduction(model: nn.Module) -> None:
    """Make every FSDP module of ``model`` sum gradients over its mesh (no averaging)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients after the next backward (``True``), or keep accumulating them locally."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """``params`` with a gradient, grouped by device mesh (plain tensors together), in parameter order."""
    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    return list(groups.values())


def total_grad_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """The 2-norm of all gradients of ``params``, whole (not a shard's), as a plain float32 scalar.

    Collective over every mesh the gradients live on; all ranks must call it with the same parameters.
    """
    norms = []
    for group in _by_mesh(params):
        norm = get_total_norm([p.grad for p in group], 2.0, error_if_nonfinite=False, foreach=True)
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
    if not norms:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_grads(params: list[nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients in place so that their total norm is at most ``max_norm`` (as ``clip_grad_norm_``)."""
    for group in _by_mesh(params):
        clip_grads_with_norm_(group, max_norm, total_norm, foreach=True)
