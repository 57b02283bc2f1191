"""Initialise megatron-parallel parameters with the one-process weights, one full parameter at a time.

The network's own ``init_weights`` runs once over a meta-device skeleton of the whole network, so the
random stream is consumed in the same order as in the local runtime. Each skeleton parameter is an
:class:`InitTarget`: what the initialiser writes into it (a full-size draw through ``copy_``, or a
``zero_``/``fill_``) goes to this rank's piece of it -- a tensor-parallel slice, the whole tensor, or
nothing when another pipeline stage owns it. At most one full parameter exists at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn


@attrs.frozen
class Piece:
    """Where this rank keeps a parameter: ``tensor`` holds slice ``rank`` of ``parts`` along ``dim`` (or all)."""

    tensor: torch.Tensor
    """This rank's storage (a megatron layer's weight, a plain parameter...)."""
    dim: int | None = None
    """Partition dimension; ``None``: the whole parameter."""
    rank: int = 0
    """This rank's index along ``dim``."""
    parts: int = 1
    """Number of slices along ``dim``."""

    def write(self, value: torch.Tensor | float) -> None:
        """Copy this rank's part of the full ``value`` (or fill with a scalar)."""
        with torch.no_grad():
            if not isinstance(value, torch.Tensor):
                self.tensor.fill_(value)
                return
            if self.dim is not None:
                n = value.shape[self.dim] // self.parts
                value = value.narrow(self.dim, self.rank * n, n)
            self.tensor.copy_(value.reshape(self.tensor.shape))

    def full(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor (for loading whole weights)."""
        if self.dim is None:
            return value
        n = value.shape[self.dim] // self.parts
        return value.narrow(self.dim, self.rank * n, n)


class InitTarget(torch.Tensor):
    """A meta tensor of a parameter's full shape that routes in-place initialisation to a :class:`Piece`."""

    piece: Piece | None

    @staticmethod
    def __new__(cls, like: torch.Tensor, piece: Piece | None) -> InitTarget:
        target = torch.Tensor._make_subclass(cls, torch.empty(like.shape, dtype=like.dtype, device="meta"))
        target.piece = piece
        return target

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else None
        if isinstance(target, InitTarget) and func in _WRITES:
            if target.piece is not None:
                target.piece.write(_WRITES[func](args, kwargs))
            return target
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


_WRITES = {
    torch.Tensor.copy_: lambda args, kwargs: args[1],
    torch.Tensor.zero_: lambda args, kwargs: 0.0,
    torch.Tensor.fill_: lambda args, kwargs: float(args[1]),
}


def initialise(skeleton: nn.Module, pieces: Mapping[str, Piece], seed: int) -> None:
    """Run ``skeleton.init_weights`` from ``seed``, sending each parameter's values to ``pieces[name]``.

    Args:
        skeleton: The whole network on the meta device (its parameters are replaced in place).
        pieces: This rank's storage of each parameter it holds, by the network's parameter names.
        seed: The local runtime's weight seed.

    Raises:
        ValueError: If ``pieces`` names a parameter the network does not have.
    """
    names = dict(skeleton.named_parameters())
    unknown = sorted(set(pieces) - set(names))
    if unknown:
        raise ValueError(f"no such parameters in {type(skeleton).__name__}: {unknown[:5]}")
    for name, param in names.items():
        module_name, _, attr = name.rpartition(".")
        module = skeleton.get_submodule(module_name)
        module._parameters[attr] = InitTarget(param, pieces.get(name))  # type: ignore[assignment]
    skeleton.init_weights(torch.Generator().manual_seed(seed))
