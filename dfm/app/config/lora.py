"""The ``lora`` section: low-rank adapters trained on a frozen network (``peft``)."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from attrs import validators as v

from dfm.app.config.checks import choice, finite_positive, non_empty, optional, positive
from dfm.ports.runtime import LoraSettings

BaseDtype = Literal["float32", "bfloat16"]


def _patterns(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(p) for p in value)  # type: ignore[union-attr]


def _non_empty_patterns(_inst: object, attr: attrs.Attribute, value: tuple[str, ...] | None) -> None:
    if value is not None and (not value or any(not p for p in value)):
        raise ValueError(f"{attr.name} must be null or a non-empty list of module-name patterns")


@attrs.frozen(kw_only=True)
class LoraConfig:
    """LoRA fine-tuning: unset ``rank`` trains every weight; set, only adapters on the targeted linears train."""

    rank: int | None = attrs.field(default=None, validator=optional(positive))
    """Adapter rank ``r``; ``null``: no LoRA (full training). Typical: 16-128."""
    alpha: float | None = attrs.field(default=None, validator=optional(finite_positive))
    """Scale numerator: updates are ``alpha / rank * B A``; ``null``: ``alpha = rank`` (scale 1)."""
    dropout: float = attrs.field(default=0.0, validator=v.and_(v.ge(0.0), v.lt(1.0)))
    """Dropout on the adapters' input."""
    targets: tuple[str, ...] | None = attrs.field(default=None, converter=_patterns, validator=_non_empty_patterns)
    """Linears to adapt, as ``fnmatch`` globs over module names (e.g. ``blocks.*.attn1.to_q``); ``null``: the
    attention projections (q, k, v, out of self- and cross-attention) and the feed-forward linears."""
    base_dtype: BaseDtype = attrs.field(default="float32", validator=choice(BaseDtype))
    """The frozen weights' dtype: ``bfloat16`` halves their memory (needs ``train.precision: bf16`` or ``auto`` on
    a GPU); the adapters are float32 either way."""
    init_from: str | None = attrs.field(default=None, validator=optional(non_empty))
    """An adapter file (safetensors, the diffusers/PEFT naming ``convert export-lora`` writes) to start a fresh
    run's adapters from; its rank must equal ``rank``. Ignored when the run resumes a checkpoint."""

    @property
    def enabled(self) -> bool:
        """Whether the run trains adapters."""
        return self.rank is not None

    def settings(self) -> LoraSettings | None:
        """The runtime's LoRA settings (``None`` when ``rank`` is unset)."""
        if self.rank is None:
            return None
        alpha = float(self.alpha if self.alpha is not None else self.rank)
        return LoraSettings(
            rank=self.rank,
            alpha=alpha,
            dropout=self.dropout,
            targets=self.targets,
            base_dtype=getattr(torch, self.base_dtype),
        )
