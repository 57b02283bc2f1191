"""One model chunk as megatron's pipeline schedules drive it: ``set_input_tensor``, stage-wise forward.

Between pipeline stages one tensor travels, ``[B, N, h]``: this rank's video tokens followed by the
conditioning the blocks read (WAN: embedded text, the six modulations, the timestep embedding; DiT: the
text and the noise embedding), concatenated along the sequence. Gradients flow back through it to the
first stage's embeddings. RoPE tables, the text mask and the grid carry no gradient: each stage
rebuilds them from the batch. With context parallelism every rank of the group gets the same full
inputs, keeps its contiguous chunk of the tokens (global RoPE rows) and the last stage gathers the
projected patches (see :mod:`dfm.adapters.torch_dist.sequence`). With megatron sequence parallelism the
tokens are further split over the tensor-parallel ranks between the blocks' parallel linears (which
gather and reduce-scatter them) and gathered again before the replicated output head.

The training objective calls the chunk like the whole network (``chunk(x, timestep, text, mask)``).
A chunk that is not the last returns zeros in the prediction's shape (its loss is never used) and
leaves the tensor for the next stage in :attr:`Chunk.output`.
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

from dfm.adapters.torch_dist.sequence import gather_sequence, shard_sequence
from dfm.domain.networks.layers import token_positions

_TEXT = "context"
_ROWS = {_TEXT: None, "temb": 1}
"""Rows of the known carried fields: the text length (``None``) and one for a ``[B, h]`` embedding."""
_NOT_CARRIED = ("tokens", "rope", "mask", "grid")


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
        self.output: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Megatron's hook: the tensor received from the previous stage (before :meth:`forward`)."""
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The prediction ``[B, C_out, F, H, W]`` on the last stage; zeros of that shape elsewhere."""
        net = self.network
        if self.first:
            inputs = net.embed(x.to(self.dtype), timestep, text.to(self.dtype), text_mask)
            tokens = inputs.tokens if self.cp == 1 else shard_sequence(inputs.tokens, 1, self.cp_group)
            if self.sp > 1:
                tokens = self._split_tokens(tokens)
        else:
            inputs, tokens = self._unpack(x, text, text_mask)
        if self.cp > 1:
            inputs = inputs._replace(rope=tuple(shard_sequence(t, 0, self.cp_group) for t in inputs.rope))
        tokens = net.run_blocks(tokens, self._for_blocks(inputs))
        if not self.last:
            self.output = self._pack(tokens, inputs)
            spec = net.spec
            return x.new_zeros((x.shape[0], spec.out_channels, *x.shape[2:]), dtype=torch.float32)
        if self.sp > 1:  # the head is replicated: each rank's gradient is whole, so backward only splits
            tokens = gather_from_sequence_parallel_region(tokens.transpose(0, 1).contiguous(), False).transpose(0, 1)
        patches = net.project(tokens, inputs.temb)
        if self.cp > 1:
            patches = gather_sequence(patches, 1, self.cp_group)
        return net.unpatchify(patches, inputs.grid)

    def _for_blocks(self, inputs: Any) -> Any:
        """The blocks' inputs; with sequence parallelism, per-sample conditioning that modulates the split
        tokens (WAN's modulations, DiT's ``c``) sums its partial gradients over the tensor-parallel group.

        The text needs no sum: the key/value linears reduce its gradient themselves.
        """
        if self.sp == 1:
            return inputs
        fields = [f for f in self._carried(inputs) if f != _TEXT]
        return inputs._replace(**{f: copy_to_tensor_model_parallel_region(getattr(inputs, f)) for f in fields})

    def _split_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's contiguous share of the sequence (megatron sequence parallelism)."""
        if tokens.shape[1] % self.sp:
            raise ValueError(
                f"megatron.sequence_parallel: {tokens.shape[1]} video tokens per rank do not split over "
                f"parallel.tensor={self.sp} ranks; choose a latent size whose token count divides"
            )
        return scatter_to_sequence_parallel_region(tokens.transpose(0, 1).contiguous()).transpose(0, 1)

    def _carried(self, inputs: Any) -> list[str]:
        return [f for f in inputs._fields if f not in _NOT_CARRIED]

    def _pack(self, tokens: torch.Tensor, inputs: Any) -> torch.Tensor:
        parts = [tokens]
        for name in self._carried(inputs):
            value = getattr(inputs, name)
            parts.append((value.unsqueeze(1) if value.ndim == 2 else value).to(tokens.dtype))
        return torch.cat(parts, dim=1)

    def _unpack(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        """The blocks' inputs from the received tensor and the batch (this rank's token rows first)."""
        packed = self.input_tensor
        assert packed is not None, "a later pipeline stage ran before set_input_tensor"
        spec, fields = self.network.spec, self.network.inputs_type._fields
        rope, mask, grid = token_positions(x.shape, spec.patch_size, spec.attention_head_dim, text_mask, x.device)
        length = grid[0] * grid[1] * grid[2] // (self.cp * self.sp)
        carried = [f for f in fields if f not in _NOT_CARRIED]
        rows = {f: _ROWS.get(f, 0) or (text.shape[1] if f == _TEXT else 0) for f in carried}
        unknown = [f for f in carried if rows[f] == 0]
        assert len(unknown) <= 1, f"cannot split {unknown} from the pipeline tensor"
        if unknown:
            rows[unknown[0]] = packed.shape[1] - length - sum(rows.values())
        pieces = packed.split([length, *(rows[f] for f in carried)], dim=1)
        values = {f: (p.squeeze(1) if f == "temb" else p) for f, p in zip(carried, pieces[1:], strict=True)}
        known = {"tokens": pieces[0], "rope": rope, "mask": mask, "grid": grid}
        return self.network.inputs_type(**{f: values.get(f, known.get(f)) for f in fields}), pieces[0]
