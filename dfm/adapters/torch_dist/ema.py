"""One exponential moving average of the weights for every runtime, checkpointed like ``AveragedModel``.

The average starts at the weights the run starts from (``e_0 = theta_0``) and follows
``e_k = d * e_{k-1} + (1 - d) * theta_k`` after every optimizer step ``k`` — the formula of
``torch.optim.swa_utils.get_ema_multi_avg_fn``, applied with ``torch._foreach_lerp_`` — so after ``K`` steps
``e_K = d^K theta_0 + (1 - d) * sum_{k=1..K} d^(K-k) theta_k``.

The runtime hands it the tensors that hold the average, by parameter name: the parameters of a frozen
copy of the network (``local``; ``fsdp2``, sharded like the trained one, so each rank averages its own
shards), or float32 copies of this rank's parameters (``megatron``). The average is taken shard by shard on
the local parts (a ``DTensor``'s ``to_local()``), in the average's dtype. Its state is ``{"n_averaged",
"module.<name>": ...}``, ``AveragedModel``'s layout, so every runtime's checkpoints load in every other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from dfm.adapters.torch_dist.state import check_compatible

PREFIX = "module."
"""``AveragedModel``'s prefix of the averaged network's parameter names in its state."""


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (a ``DTensor``'s local shard; a plain tensor itself)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_decay(decay: float | None) -> None:
    """Raise ``ValueError`` (naming ``train.ema_decay``) unless ``decay`` is ``None`` or in ``(0, 1)``."""
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"train.ema_decay must be in (0, 1) or None, got {decay}")


class EMA:
    """The EMA of a network's weights, kept in ``average`` (tensors by parameter name, aliased, never replaced).

    Args:
        average: The tensors holding the average (a frozen network's parameters, or copies), by name.
        decay: ``d`` in ``(0, 1)``.

    Raises:
        ValueError: If ``decay`` is not in ``(0, 1)``.
    """

    def __init__(self, average: Mapping[str, torch.Tensor], decay: float) -> None:
        check_decay(decay)
        self.average = dict(average)
        self.decay = decay
        self.n_averaged = torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def update(self, current: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Average in the current weights ``(name, tensor)`` (copied on the first update after a reset)."""
        now = dict(current)
        ema = [local_part(t) for t in self.average.values()]
        src = [local_part(now[name].detach()) for name in self.average]
        src = [s if s.dtype == e.dtype else s.to(e.dtype) for s, e in zip(src, ema, strict=True)]
        if int(self.n_averaged) == 0:
            torch._foreach_copy_(ema, src)
        else:
            torch._foreach_lerp_(ema, src, 1.0 - self.decay)
        self.n_averaged += 1

    def reset(self, current: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Restart the average at the current weights."""
        self.n_averaged.zero_()
        self.update(current)

    def state_dict(self) -> dict[str, Any]:
        """``{"n_averaged": tensor, "module.<name>": average, ...}`` aliasing the live tensors."""
        return {"n_averaged": self.n_averaged, **{PREFIX + name: t for name, t in self.average.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (or ``AveragedModel.state_dict()``), copying; strict.

        Raises:
            ValueError: Naming the missing, unexpected or mis-shaped entries.
        """
        check_compatible(self.state_dict(), state, "checkpointed EMA weights")
        for name, tensor in self.average.items():
            loaded = state[PREFIX + name]
            if loaded is not tensor:
                tensor.copy_(loaded)
        self.n_averaged.copy_(torch.as_tensor(state["n_averaged"]))
