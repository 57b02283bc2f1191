"""Context parallelism over the sequence: shard, gather, and Ulysses attention (all-to-all over heads).

Every context-parallel rank receives the same full inputs and computes the same loss on the same
full prediction. In between, each rank keeps one contiguous chunk of the token sequence
(:func:`shard_sequence`), runs the blocks on it (attention sees the whole sequence through
:class:`UlyssesAttention`), and the output is gathered back (:class:`GatherSequence`). A parameter's
true gradient is then the SUM of the ranks' gradients (the FSDP reduction over ``dp_shard_cp``):

- :func:`shard_sequence`'s backward puts the chunk's gradient in place and zeros elsewhere;
- :class:`GatherSequence`'s backward returns only this rank's slice of the (identical) output gradient.
  An all-gather whose backward is a reduce-scatter (``all_gather_tensor_autograd``) would multiply the
  gradient by the context-parallel size here, because every rank already holds the full gradient.

Ulysses (Jacobs et al., "DeepSpeed Ulysses", 2023): q/k/v ``[B, H, L/cp, D]`` are exchanged all-to-all so
each rank holds ``H/cp`` heads of the full sequence ``[B, H/cp, L, D]``, any attention kernel runs on
those, and the inverse exchange returns ``[B, H, L/cp, D]``. It is exact and works with any SDPA
backend, on CPU too (``gloo``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from dfm.domain.networks.attention import AttentionKernel, SDPAAttention
from dfm.domain.networks.plan import ParallelPlan


def _chunk_length(x: torch.Tensor, dim: int, world: int, what: str) -> int:
    if x.shape[dim] % world:
        raise ValueError(
            f"{what}: the sequence length {x.shape[dim]} (dim {dim} of shape {tuple(x.shape)}) is not divisible by "
            f"the context-parallel size {world}; choose a video size whose token count is a multiple of "
            "parallel.context"
        )
    return x.shape[dim] // world


def shard_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's contiguous chunk ``[r * n, (r + 1) * n)`` of ``x`` along ``dim`` (``n = len / world``).

    Differentiable: the gradient flows into the chunk's positions of ``x``, zeros elsewhere.

    Raises:
        ValueError: If the length along ``dim`` is not divisible by the group size.
    """
    world = dist.get_world_size(group)
    n = _chunk_length(x, dim, world, "shard_sequence")
    return x.narrow(dim, dist.get_rank(group) * n, n)


_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""``all_gather_single`` (torch >= 2.13, where ``all_gather_into_tensor`` is deprecated), else the older name."""


class GatherSequence(torch.autograd.Function):
    """All-gather equal chunks along ``dim`` (rank order); the backward keeps only this rank's slice.

    ``GatherSequence.apply(x, dim, group)``. The output gradient must be the same on every rank (each
    computes the same loss from the gathered tensor); see the module docstring.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        world = dist.get_world_size(group)
        dim = dim % x.ndim
        ctx.dim, ctx.rank, ctx.length = dim, dist.get_rank(group), x.shape[dim]
        if world == 1:
            return x.clone()
        local = x.movedim(dim, 0).contiguous()
        out = local.new_empty((world * local.shape[0], *local.shape[1:]))
        _all_gather_into(out, local, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.narrow(ctx.dim, ctx.rank * ctx.length, ctx.length).contiguous(), None, None


def gather_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """:class:`GatherSequence` as a function: the full sequence from every rank's chunk along ``dim``."""
    return GatherSequence.apply(x, dim, group)


class UlyssesAttention:
    """A sequence-parallel attention kernel: all-to-all over heads around an inner kernel.

    It has the call signature of :class:`dfm.domain.networks.attention.AttentionKernel`, so a runtime
    swaps it in for a module's ``kernel``. The inputs are this rank's contiguous chunk of the sequence,
    in rank order.

    Args:
        inner: The kernel that runs on ``[B, H/cp, L, D]`` (e.g. ``SDPAAttention(backend)``).
        group: The context-parallel process group (``mesh["cp"].get_group()``).
    """

    def __init__(self, inner: AttentionKernel, group: dist.ProcessGroup) -> None:
        self.inner = inner
        self.group = group
        self.world = dist.get_world_size(group)

    @torch.compiler.disable  # collectives run eagerly between compiled block pieces (see docs/benchmarks.md)
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of this rank's queries ``[B, H, L/cp, D]`` over the full sequence's keys and values.

        Args:
            q: Queries ``[B, H, L/cp, D]``.
            k: Keys ``[B, H, S/cp, D]``.
            v: Values ``[B, H, S/cp, Dv]``.
            mask: ``None``, or a key mask over the full sequence: boolean/additive ``[B | 1, 1, 1, S]``.

        Raises:
            ValueError: If the heads are not divisible by the group size, or the mask is not a key mask.
        """
        if self.world == 1:
            return self.inner(q, k, v, mask)
        if q.shape[1] % self.world:
            raise ValueError(
                f"Ulysses context parallelism splits the attention heads over parallel.context={self.world} ranks, "
                f"but this rank holds {q.shape[1]} heads (after tensor parallelism); choose parallel.context and "
                "parallel.tensor whose product divides the model's heads"
            )
        if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1):
            raise ValueError(
                "UlyssesAttention supports only key masks [B | 1, 1, 1, S] over the full sequence, "
                f"got a mask of shape {tuple(mask.shape)}"
            )
        out = self.inner(self._heads_to_sequence(q), self._heads_to_sequence(k), self._heads_to_sequence(v), mask)
        return self._sequence_to_heads(out)

    def _heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, n, D]`` (this rank's tokens, all heads) -> ``[B, H/cp, cp * n, D]`` (its heads, all tokens)."""
        B, H, n, D = x.shape
        cp = self.world
        send = x.reshape(B, cp, H // cp, n, D).transpose(0, 1).contiguous()  # [cp: head group to send to, ...]
        recv = all_to_all_single_autograd(send, None, None, self.group)  # [cp: rank the tokens came from, ...]
        return recv.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * n, D)

    def _sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_heads_to_sequence`: ``[B, H/cp, cp * n, D]`` -> ``[B, H, n, D]``."""
        B, h, L, D = x.shape
        cp = self.world
        send = x.reshape(B, h, cp, L // cp, D).permute(2, 0, 1, 3, 4).contiguous()  # [cp: rank owning the tokens, ...]
        recv = all_to_all_single_autograd(send, None, None, self.group)  # [cp: head group it came from, ...]
        return recv.transpose(0, 1).reshape(B, cp * h, L // cp, D)

    def __repr__(self) -> str:
        return f"UlyssesAttention({self.inner!r}, cp={self.world})"


def use_ulysses_attention(network: nn.Module, plan: ParallelPlan, group: dist.ProcessGroup, backend: str) -> int:
    """Swap the kernel of every ``plan.sequence_parallel_attention`` module for Ulysses over ``group``.

    Each module gets its own kernel attribute (WAN's self- and cross-attention share one kernel object;
    only self-attention is swapped). Returns how many modules were swapped.

    Raises:
        ValueError: If the plan names no such module (the network cannot shard its sequence).
    """
    modules = plan.modules_matching(network, plan.sequence_parallel_attention)
    if not modules:
        raise ValueError(
            f"parallel.context={dist.get_world_size(group)}: {type(network).__name__}'s parallel plan names no "
            "sequence-parallel attention; set parallel.context=1"
        )
    for _, module in modules:
        module.kernel = UlyssesAttention(SDPAAttention(backend), group)
    return len(modules)
