"""One model chunk as megatron's pipeline schedules drive it: ``set_input_tensor``, stage-wise forward.

Between pipeline stages one tensor travels, ``[B, N, h]``: a packed :class:`~dfm.domain.networks.stages.StageCarry`,
this rank's video tokens followed by the conditioning the blocks read as the network declares it
(``carried``; WAN: embedded text, the six modulations, the timestep embedding; DiT: the text and the noise
embedding), concatenated along the sequence. Gradients flow back through it to the
first stage's embeddings. RoPE tables, the text mask and the grid carry no gradient: each stage
rebuilds them from the batch. With context parallelism every rank of the group gets the same full
inputs, keeps its contiguous chunk of the tokens (global RoPE rows) and the last stage gathers the
projected patches (see :mod:`dfm.adapters.torch_dist.sequence`). With megatron sequence parallelism the
tokens are further split over the tensor-parallel ranks between the blocks' parallel linears (which
gather and reduce-scatter them) and gathered again before the replicated output head.

The runtime calls the chunk like the whole network (``chunk(x, timestep, text, mask)``, the objective's
prepared call, :meth:`dfm.domain.objective.Objective.prepare`): the last chunk returns the prediction, which
the objective's :meth:`~dfm.domain.objective.Objective.loss` turns into the loss; any other chunk returns
the tensor megatron sends to the next stage, and no loss is computed there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from torch import nn

from dfm.adapters.torch_dist.staged import enter_stages, exit_stages, shard_positions
from dfm.domain.networks.layers import token_positions
from dfm.domain.networks.stages import TEXT_ROWS, StageCarry


class Chunk(nn.Module):
    """A pipeline chunk of the network (see the module docstring).

    Args:
        network: The domain network holding only this chunk's blocks and stage modules.
        layout: Which blocks the chunk holds and whether it is the first and/or the last part.
        config: Megatron's ``TransformerConfig`` (read by its DDP and schedules; ``sequence_parallel``).
        cp_group: The context-parallel group, or ``None``.
        dtype: Compute dtype of the first stage's ``x`` and ``text``.
    """

    def __init__(
        self, network: nn.Module, layout: Any, config: Any, cp_group: dist.ProcessGroup | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.network = network
        self.first, self.last, self.blocks = layout.first, layout.last, layout.blocks
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.cp_group = cp_group
        self.cp = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.sp = mpu.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
        self.dtype = dtype
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Megatron's hook: the tensor received from the previous stage (before :meth:`forward`)."""
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The prediction ``[B, C_out, F, H, W]`` on the last stage; elsewhere the tensor for the next stage."""
        net = self.network
        if self.first:
            inputs, tokens = enter_stages(
                net, x.to(self.dtype), timestep, text.to(self.dtype), text_mask, self.cp_group
            )
            if self.sp > 1:
                tokens = self._split_tokens(tokens)
        else:
            inputs, tokens = self._received(x, text, text_mask)
        tokens = net.run_blocks(tokens, self._for_blocks(inputs))
        if not self.last:
            return StageCarry.of(net, tokens, inputs).pack()
        if self.sp > 1:  # the head is replicated: each rank's gradient is whole, so backward only splits
            tokens = gather_from_sequence_parallel_region(tokens.transpose(0, 1).contiguous(), False).transpose(0, 1)
        return exit_stages(net, tokens, inputs, self.cp_group)

    def _for_blocks(self, inputs: Any) -> Any:
        """The blocks' inputs; with sequence parallelism, per-sample conditioning that modulates the split
        tokens (WAN's modulations, DiT's ``c``) sums its partial gradients over the tensor-parallel group.

        The text needs no sum: the key/value linears reduce its gradient themselves.
        """
        if self.sp == 1:
            return inputs
        fields = [name for name, rows in self.network.carried if rows is not TEXT_ROWS]
        return inputs._replace(**{f: copy_to_tensor_model_parallel_region(getattr(inputs, f)) for f in fields})

    def _split_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's contiguous share of the sequence (megatron sequence parallelism)."""
        if tokens.shape[1] % self.sp:
            raise ValueError(
                f"megatron.sequence_parallel: {tokens.shape[1]} video tokens per rank do not split over "
                f"parallel.tensor={self.sp} ranks; choose a latent size whose token count divides"
            )
        return scatter_to_sequence_parallel_region(tokens.transpose(0, 1).contiguous()).transpose(0, 1)

    def _received(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> tuple[Any, torch.Tensor]:
        """The blocks' inputs from the previous stage's :class:`StageCarry` and positions rebuilt from the batch."""
        assert self.input_tensor is not None, "a later pipeline stage ran before set_input_tensor"
        spec = self.network.spec
        positions = token_positions(x.shape, spec.patch_size, spec.attention_head_dim, text_mask, x.device)
        grid = positions[2]
        length = grid[0] * grid[1] * grid[2] // (self.cp * self.sp)
        carry = StageCarry.unpack(self.network, self.input_tensor, length, text.shape[1])
        return shard_positions(carry.inputs(self.network, positions), self.cp_group), carry.tokens
