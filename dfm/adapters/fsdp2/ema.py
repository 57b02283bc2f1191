"""An exponential moving average of sharded weights, checkpointed like ``torch.optim.swa_utils.AveragedModel``.

``AveragedModel`` deep-copies its model, which an FSDP2 module does not allow. The average here is a
second network built and sharded exactly like the trained one (so each rank holds the same shards of
both) and updated shard by shard with the formula of ``get_ema_multi_avg_fn``:
``e_k = d * e_{k-1} + (1 - d) * theta_k`` (``lerp``), the first update copying. Its state is
``{"n_averaged", "module.<name>": ...}``, ``AveragedModel``'s layout, so the local runtime's
checkpoints load here and back (resharded by the checkpoint store).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from dfm.adapters.torch_dist.state import check_compatible

PREFIX = "module."
"""``AveragedModel``'s prefix of the averaged network's parameter names."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEMA:
    """The EMA of a sharded network's weights, kept in ``module`` (a frozen network of the same layout).

    Args:
        module: The network holding the average, sharded like the trained one.
        decay: ``d`` in ``(0, 1)``.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.module = module.requires_grad_(False)
        self.decay = decay
        self.n_averaged = torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s current weights (copied on the first update)."""
        ema = [_local(p) for p in self.module.parameters()]
        current = [_local(p.detach()) for p in model.parameters()]
        if int(self.n_averaged) == 0:
            torch._foreach_copy_(ema, current)
        else:
            torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        self.n_averaged += 1

    def reset(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current weights."""
        self.n_averaged.zero_()
        self.update(model)

    def state_dict(self) -> dict[str, Any]:
        """``{"n_averaged": tensor, "module.<name>": (sharded) weight, ...}`` aliasing the live tensors."""
        weights = get_model_state_dict(self.module)
        return {"n_averaged": self.n_averaged, **{PREFIX + name: value for name, value in weights.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (or ``AveragedModel.state_dict()``); strict.

        Raises:
            ValueError: Naming the missing, unexpected or mis-shaped entries.
        """
        check_compatible(self.state_dict(), state, "checkpointed EMA weights")
        weights = {name.removeprefix(PREFIX): value for name, value in state.items() if name != "n_averaged"}
        set_model_state_dict(self.module, weights)
        self.n_averaged.copy_(state["n_averaged"])
