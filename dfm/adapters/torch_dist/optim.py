"""AdamW with decoupled weight decay, its parameter groups and an eagerly created state.

Weight-decay rule (the network's plan, :meth:`~dfm.domain.networks.plan.ParallelPlan.decays`): decay the
weight matrices and kernels (parameters with ``ndim >= 2``) except those the plan names in ``no_weight_decay``
(WAN's adaLN ``scale_shift_table`` s); never decay biases, norm scales or any other 1-D parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dfm.domain.networks.plan import ParallelPlan
from dfm.ports.runtime import OptimizerSettings


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups of the trainable parameters: decayed (``weight_decay``) and not (``0``); empty ones dropped.

    ``model`` is a network with a ``parallel_plan`` (possibly wrapped by FSDP, which keeps its attributes).
    """
    plan: ParallelPlan = model.parallel_plan
    decayed, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decayed if plan.decays(name, param) else plain).append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(model: nn.Module, settings: OptimizerSettings, *, fused: bool) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups`, its state created at once (see :func:`materialize_state`).

    Args:
        model: The network (fp32 parameters on their final device).
        settings: Peak rate, betas, epsilon and weight decay.
        fused: Use the fused kernel (CUDA).
    """
    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        fused=True if fused else None,
    )
    materialize_state(optimizer)
    return optimizer


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state now, exactly as its first step would find it.

    A checkpoint loader (``torch.distributed.checkpoint.load``) loads in place into a state dict of the
    same structure, so a fresh optimizer must already hold its moment tensors. Like
    ``torch.distributed.checkpoint.state_dict`` does, this runs one step with zero gradients and a zero
    learning rate (AdamW leaves the parameters bit-identical and its moments zero); unlike it, the step
    counters are then reset to zero, so the first real step is the one a fresh optimizer would take.
    """
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.grad is None for p in params), "materialize_state needs an optimizer that has not run"
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def own_group_settings(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """Keep the optimizers' parameter-group settings through a checkpoint load done inside the block.

    Everything a group holds besides its parameters (learning rate, betas, epsilon, weight decay, kernel
    flags such as ``fused``) is put back as the runtime built it, i.e. from the current config; the load
    keeps supplying the per-parameter state (moments, step counters). So a run resumed with a changed
    ``optim.*`` setting uses the new value. Entries the load adds that the groups did not have are kept.
    """
    optimizers = list(optimizers)
    own = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]
    yield
    for optimizer, settings in zip(optimizers, own, strict=True):
        for group, saved in zip(optimizer.param_groups, settings, strict=True):  # a load keeps the group count
            group.update(saved)
