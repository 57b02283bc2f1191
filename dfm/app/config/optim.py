"""The ``optim`` section: AdamW and its learning-rate schedule."""

from __future__ import annotations

from typing import Literal

import attrs

from dfm.app.config.checks import choice, finite_non_negative, finite_positive, non_negative, unit_interval

Schedule = Literal["constant", "cosine"]


def _to_betas(value: object) -> tuple[float, float]:
    return tuple(float(b) for b in value)  # type: ignore[attr-defined,return-value]


def _betas_validator(_inst: object, attr: attrs.Attribute, value: tuple[float, ...]) -> None:
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"{attr.name} must be two floats in [0, 1), got {list(value)!r}")


@attrs.frozen(kw_only=True)
class OptimConfig:
    """AdamW (decoupled weight decay) with linear warmup, then a constant or cosine learning rate."""

    lr: float = attrs.field(default=1e-4, validator=finite_positive)
    """Peak learning rate (reached after warmup). A resumed run uses this value (and the betas, epsilon,
    weight decay and schedule below) even when its checkpoint was trained with others."""
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), converter=_to_betas, validator=_betas_validator)
    """AdamW ``(beta1, beta2)``."""
    weight_decay: float = attrs.field(default=0.0, validator=finite_non_negative)
    """Decoupled weight decay."""
    eps: float = attrs.field(default=1e-8, validator=finite_positive)
    """AdamW epsilon."""
    schedule: Schedule = attrs.field(default="constant", validator=choice(Schedule))
    """Learning rate after warmup: ``constant``, or ``cosine`` decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    warmup_steps: int = attrs.field(default=0, validator=non_negative)
    """Steps of linear warmup: step s < warmup_steps uses ``lr * (s + 1) / (warmup_steps + 1)``."""
    min_lr_ratio: float = attrs.field(default=0.0, validator=unit_interval)
    """Final learning rate of the cosine schedule as a fraction of ``lr``."""
