"""RMSNorm over channels split across tensor-parallel ranks (WAN's q/k norm over all heads)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.tensor import DTensor


class HeadNormForward:
    """An ``nn.RMSNorm``'s forward over channels split across the tensor-parallel group.

    ``y = x * rsqrt(sum_ranks(sum_local(x^2)) / dim + eps) * weight_local`` (Zhang & Sennrich, 2019):
    each rank holds ``dim / tp`` channels of every token, so the sum of squares is all-reduced (only
    ``[..., 1]`` per token; the autograd all-reduce sums the gradient in the backward pass, which is
    exact because the full sum of squares is the sum of the ranks' sums).

    Args:
        norm: The ``nn.RMSNorm``; its ``weight`` holds this rank's channels (a plain tensor, or a ``DTensor``
            sharded as ``Shard(0)`` on the tensor-parallel mesh).
        group: The tensor-parallel process group.
    """

    def __init__(self, norm: nn.RMSNorm, group: dist.ProcessGroup) -> None:
        (self.dim,) = norm.normalized_shape
        self.norm = norm
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.norm.weight
        weight = weight.to_local() if isinstance(weight, DTensor) else weight
        eps = torch.finfo(x.dtype).eps if self.norm.eps is None else self.norm.eps
        xf = x.float()
        squares = dist_fn.all_reduce(xf.square().sum(-1, keepdim=True), group=self.group)
        return (xf * torch.rsqrt(squares / self.dim + eps) * weight).type_as(x)
