"""An exponential moving average of the weights (``torch.optim.swa_utils.AveragedModel``).

The average starts at the weights the run starts from (``e_0 = theta_0``) and follows
``e_k = d * e_{k-1} + (1 - d) * theta_k`` after every optimizer step ``k``, so after ``K`` steps
``e_K = d^K theta_0 + (1 - d) * sum_{k=1..K} d^(K-k) theta_k``. Buffers are averaged too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

EMA_PREFIX = "module."
"""``AveragedModel``'s prefix of the averaged network's names in its state (``module.<name>``, ``n_averaged``)."""


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen copy of ``model`` (same device) averaged with decay ``decay``, starting at ``model``'s weights.

    Raises:
        ValueError: If ``decay`` is not in ``(0, 1)``.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.module.requires_grad_(False)
    reset_ema(ema, model)
    return ema


@torch.no_grad()
def reset_ema(ema: AveragedModel, model: nn.Module) -> None:
    """Restart the average at ``model``'s current weights (``AveragedModel`` copies on its first update)."""
    ema.n_averaged.zero_()
    ema.update_parameters(model)
