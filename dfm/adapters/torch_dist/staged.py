"""The root network's forward as explicit stages: casts, and context parallelism over the video tokens.

:class:`StagedForward` replaces the root network's ``forward`` on the instance, so the caller (the
training objective, a sampler) calls the module as usual and parameter names do not change. The fsdp2
runtime installs it for training (FSDP's hooks on the root, which gather the root's own parameters --
embeddings, output head -- still wrap every stage); multi-process generation
(:mod:`dfm.adapters.torch_dist.parallel_sampling`) installs it on an unsharded network for inference.
With ``cp`` context-parallel ranks it runs, on identical full inputs on every rank of the group (see
:mod:`dfm.adapters.torch_dist.sequence`):

1. ``embed`` on the full inputs (patch embedding, conditioning, the global RoPE tables);
2. this rank's contiguous chunk of the tokens and the same rows of the RoPE tables (global positions);
3. the blocks, whose self-attention kernels are :class:`~dfm.adapters.torch_dist.UlyssesAttention`
   (cross-attention to the replicated text needs no communication);
4. ``project`` on the chunk (every parameterised op after the blocks), then the gather, then
   ``unpatchify``. Every rank computes the same output (and, in training, the same loss; the
   parameters' gradients are then the sum over ranks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dfm.adapters.torch_dist.sequence import gather_sequence, shard_sequence
from dfm.domain.networks.stages import StagedNetwork


class StagedForward:
    """``network(x, timestep, text, text_mask)`` run stage by stage (installed as the root's ``forward``).

    Args:
        network: A network with ``embed``, ``run_blocks``, ``project`` and ``unpatchify`` stages.
        cp_group: The context-parallel group; ``None`` runs the full sequence on this rank.
        compute_dtype: The dtype FSDP gathers parameters in (bf16 mixed precision): ``x`` and ``text``
            are cast to it, the timestep and the RoPE tables stay float32. ``None``: no cast.
    """

    def __init__(
        self, network: nn.Module, *, cp_group: dist.ProcessGroup | None, compute_dtype: torch.dtype | None
    ) -> None:
        self.network = network
        self.cp_group = cp_group
        self.cp = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.compute_dtype = compute_dtype

    def __call__(
        self,
        x: torch.Tensor | list[torch.Tensor],
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        net = self.network
        if isinstance(x, list | tuple):  # a packed sequence of samples of any sizes (data.packing)
            return self._packed(list(x), timestep, text, text_mask)
        if self.compute_dtype is not None:
            x, text = x.to(self.compute_dtype), text.to(self.compute_dtype)
        inputs, tokens = enter_stages(net, x, timestep, text, text_mask, self.cp_group, image)
        return exit_stages(net, net.run_blocks(tokens, inputs), inputs, self.cp_group)

    def _packed(
        self, x: list[torch.Tensor], timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        if self.cp_group is not None:
            raise ValueError("packed sequences do not run with context parallelism; set data.packing=false")
        if self.compute_dtype is not None:
            x, text = [xi.to(self.compute_dtype) for xi in x], text.to(self.compute_dtype)
        # the per-sample outputs are views of one tensor: copies, so that FSDP's pre-backward hooks stay attached
        return [out.clone() for out in self.network.forward_packed(x, timestep, text, text_mask)]

    def __repr__(self) -> str:
        return f"StagedForward(cp={self.cp}, compute_dtype={self.compute_dtype})"


def enter_stages(
    network: StagedNetwork,
    x: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    cp_group: dist.ProcessGroup | None,
    image: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor]:
    """``embed`` on the full inputs; with a context-parallel group, this rank's tokens and RoPE rows.

    ``image``: an image-to-video network's image features (replicated like the text).

    Returns:
        The blocks' inputs (RoPE rows of this rank's tokens) and the tokens the blocks run on.

    Raises:
        ValueError: If the tokens do not split evenly over the group.
    """
    inputs = (
        network.embed(x, timestep, text, text_mask)
        if image is None
        else network.embed(x, timestep, text, text_mask, image)
    )
    if cp_group is None:
        return inputs, inputs.tokens
    cp, length = dist.get_world_size(cp_group), inputs.tokens.shape[1]
    if length % cp:
        raise ValueError(
            f"parallel.context={cp} splits the video tokens over ranks, but these latents have {length} "
            f"tokens (grid {tuple(inputs.grid)} after patchifying), not a multiple of {cp}; choose "
            "data.frames/data.height/data.width so that the token count is divisible by parallel.context"
        )
    return shard_positions(inputs, cp_group), shard_sequence(inputs.tokens, 1, cp_group)


def shard_positions(inputs: Any, cp_group: dist.ProcessGroup | None) -> Any:
    """``inputs`` with the RoPE rows of this rank's contiguous share of the tokens (global positions)."""
    if cp_group is None:
        return inputs
    return inputs._replace(rope=tuple(shard_sequence(table, 0, cp_group) for table in inputs.rope))


def exit_stages(
    network: StagedNetwork, tokens: torch.Tensor, inputs: Any, cp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """``project`` this rank's tokens, gather them over the context-parallel group, ``unpatchify``."""
    patches = network.project(tokens, inputs.temb)
    if cp_group is not None:
        patches = gather_sequence(patches, 1, cp_group)
    return network.unpatchify(patches, inputs.grid)
