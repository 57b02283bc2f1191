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
    ) -> torch.Tensor | list[torch.Tensor]:
        net = self.network
        if isinstance(x, list | tuple):  # a packed sequence of samples of any sizes (data.packing)
            return self._packed(list(x), timestep, text, text_mask)
        if self.compute_dtype is not None:
            x, text = x.to(self.compute_dtype), text.to(self.compute_dtype)
        inputs = net.embed(x, timestep, text, text_mask)
        if self.cp_group is None:
            patches = net.project(net.run_blocks(inputs.tokens, inputs), inputs.temb)
            return net.unpatchify(patches, inputs.grid)
        self._check_length(inputs.tokens.shape[1], inputs.grid)
        rope = tuple(shard_sequence(table, 0, self.cp_group) for table in inputs.rope)
        tokens = net.run_blocks(shard_sequence(inputs.tokens, 1, self.cp_group), inputs._replace(rope=rope))
        patches = gather_sequence(net.project(tokens, inputs.temb), 1, self.cp_group)
        return net.unpatchify(patches, inputs.grid)

    def _packed(
        self, x: list[torch.Tensor], timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        if self.cp_group is not None:
            raise ValueError("packed sequences do not run with context parallelism; set data.packing=false")
        if self.compute_dtype is not None:
            x, text = [xi.to(self.compute_dtype) for xi in x], text.to(self.compute_dtype)
        # the per-sample outputs are views of one tensor: copies, so that FSDP's pre-backward hooks stay attached
        return [out.clone() for out in self.network.forward_packed(x, timestep, text, text_mask)]

    def _check_length(self, length: int, grid: Any) -> None:
        if length % self.cp:
            raise ValueError(
                f"parallel.context={self.cp} splits the video tokens over ranks, but these latents have {length} "
                f"tokens (grid {tuple(grid)} after patchifying), not a multiple of {self.cp}; choose "
                "data.frames/data.height/data.width so that the token count is divisible by parallel.context"
            )

    def __repr__(self) -> str:
        return f"StagedForward(cp={self.cp}, compute_dtype={self.compute_dtype})"
