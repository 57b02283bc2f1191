"""The learning-rate schedule: linear warmup, then constant or cosine decay to a floor.

Step ``s`` counts optimizer steps already taken (``0`` for the first update). With peak rate
``lr``, ``W = warmup_steps``, ``T = total_steps`` and ``r = min_lr_ratio`` the step uses
``lr * lr_factor(s)`` where

- ``s < W``: ``(s + 1) / (W + 1)`` (linear warmup from ``lr / (W + 1)``, as ``OptimizerSettings`` says);
- constant: ``1``;
- cosine: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``p = min(1, (s - W) / max(1, T - W))``, so the
  rate is ``lr`` at ``s = W`` and ``r * lr`` from ``s = T`` on (Loshchilov & Hutter, "SGDR", 2017).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dfm.ports.runtime import OptimizerSettings

_SCHEDULES = ("constant", "cosine")


def check_optimizer_settings(settings: OptimizerSettings) -> None:
    """Validate the settings a user controls.

    Raises:
        ValueError: On a non-positive or non-finite ``lr`` or ``eps``, a non-positive ``total_steps``, a
            negative ``warmup_steps``, a negative or non-finite ``weight_decay``, ``min_lr_ratio`` outside
            ``[0, 1]``, betas outside ``[0, 1)`` or an unknown schedule.
    """
    problems = []
    for name in ("lr", "eps"):
        value = getattr(settings, name)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name} must be a finite number > 0, got {value}")
    if settings.total_steps < 1:
        problems.append(f"total_steps must be >= 1, got {settings.total_steps}")
    if settings.warmup_steps < 0:
        problems.append(f"warmup_steps must be >= 0, got {settings.warmup_steps}")
    if not (math.isfinite(settings.weight_decay) and settings.weight_decay >= 0):
        problems.append(f"weight_decay must be a finite number >= 0, got {settings.weight_decay}")
    if not 0.0 <= settings.min_lr_ratio <= 1.0:
        problems.append(f"min_lr_ratio must be in [0, 1], got {settings.min_lr_ratio}")
    if len(settings.betas) != 2 or not all(0.0 <= b < 1.0 for b in settings.betas):
        problems.append(f"betas must be two floats in [0, 1), got {settings.betas}")
    if settings.schedule not in _SCHEDULES:
        problems.append(f"schedule must be one of {_SCHEDULES}, got {settings.schedule!r}")
    if problems:
        raise ValueError("invalid optimizer settings: " + "; ".join(problems))


def lr_factor(step: int, settings: OptimizerSettings) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based; see the module docstring)."""
    warmup = settings.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if settings.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, settings.total_steps - warmup))
    r = settings.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group (it sets step 0's rate at once)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, settings))


def scheduler_state(scheduler: LambdaLR) -> dict[str, Any]:
    """The scheduler's state without its ``lr_lambdas`` (closures are rebuilt from the settings)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler: LambdaLR, state: Mapping[str, Any]) -> None:
    """Restore the schedule's position from what :func:`scheduler_state` returned.

    Only the position (the step counter) comes from ``state``. The peak rates (``base_lrs``) stay those
    the scheduler was built with, from the current settings, and every parameter group's rate is set
    for the restored step from them: a run resumed with another ``lr`` (or warmup, schedule, length)
    goes on along the new schedule from the saved step. With unchanged settings the rates are the
    saved ones, bit for bit.

    Raises:
        ValueError: If ``state`` lacks the step counter.
    """
    if "last_epoch" not in state:
        raise ValueError(f"scheduler state has no 'last_epoch' (keys: {sorted(state)}); is it from another runtime?")
    own = list(scheduler.base_lrs)
    scheduler.load_state_dict({**dict(state), "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    scheduler.base_lrs = own
    rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, own, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    scheduler._last_lr = rates  # what get_last_lr() reports
