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


class Schedule:
    """Where a run is along :func:`lr_factor`: the step counter, and the rate of the step to come.

    Every runtime sets this rate on its optimizer's parameter groups before each step (megatron's
    optimizer is not a ``torch.optim.Optimizer``, so ``LambdaLR``, which computes the same
    ``lr * lr_factor(step)``, cannot drive all three). Its state is ``{key: steps taken}``; ``key`` is
    ``LambdaLR``'s ``last_epoch`` (the name the ``local`` and ``fsdp2`` checkpoints have always used) unless
    a runtime's checkpoints name it otherwise (megatron's ``step``).

    Args:
        settings: The peak rate and the schedule (validated by :func:`check_optimizer_settings`).
        key: The name of the step counter in :meth:`state_dict`.
    """

    def __init__(self, settings: OptimizerSettings, key: str = "last_epoch") -> None:
        check_optimizer_settings(settings)
        self.settings = settings
        self.key = key
        self.step = 0

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.settings.lr * lr_factor(self.step, self.settings)

    def advance(self) -> None:
        """One optimizer step was taken."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        """``{key: steps taken}``."""
        return {self.key: self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position from :meth:`state_dict`'s layout; the rates follow the current settings.

        Only the position comes from ``state``: a run resumed with another ``lr`` (or warmup, schedule,
        length) goes on along the new schedule from the saved step; with unchanged settings the rates are
        the saved ones, bit for bit.

        Raises:
            ValueError: If ``state`` lacks the step counter.
        """
        if self.key not in state:
            raise ValueError(
                f"scheduler state has no {self.key!r} (keys: {sorted(state)}); is it from another runtime?"
            )
        self.step = int(state[self.key])
