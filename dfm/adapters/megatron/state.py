"""The megatron runtime's checkpoint state: ``ShardedTensor`` s under the local runtime's DCP keys.

A parameter named ``n`` (its name in the whole network) is ``runtime.model.n``; a tensor-parallel one
is sharded along its partition dimension over the tensor-parallel ranks, a replicated one is written by
its main replica only. The EMA copies are ``runtime.ema.module.n`` (``AveragedModel``'s layout). The
distributed optimizer adds its own sharded entries (megatron's ``sharded_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import nn

from dfm.adapters.megatron.stage import Chunk


def named_parameters(chunks: list[Chunk], blocks: str) -> Iterator[tuple[str, nn.Parameter]]:
    """``(global name, parameter)`` of every parameter this rank holds."""
    prefix = blocks + "."
    for chunk in chunks:
        for name, param in chunk.network.named_parameters():
            if name.startswith(prefix):
                index, _, rest = name[len(prefix) :].partition(".")
                name = f"{prefix}{chunk.blocks[int(index)]}.{rest}"
            yield name, param


def sharded(key: str, tensor: torch.Tensor, like: nn.Parameter) -> ShardedTensor:
    """``tensor`` (``like`` 's data or a copy of it) as a ``ShardedTensor`` laid out like the parameter ``like``."""
    tp_rank, tp = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    dp_rank = mpu.get_data_parallel_rank(with_context_parallel=True)
    if getattr(like, "tensor_model_parallel", False) and tp > 1:
        axis = like.partition_dim
        return ShardedTensor.from_rank_offsets(key, tensor, (axis, tp_rank, tp), replica_id=(0, 0, dp_rank))
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(0, tp_rank, dp_rank))


def model_state(chunks: list[Chunk], blocks: str, prefix: str = "runtime.model.") -> dict[str, ShardedTensor]:
    """The parameters as ``ShardedTensor`` s aliasing them (loading writes into them)."""
    return {name: sharded(prefix + name, param, param) for name, param in named_parameters(chunks, blocks)}


def local_part(full: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
    """This rank's part of the whole tensor ``full`` of the parameter ``like``."""
    tp_rank, tp = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    if not getattr(like, "tensor_model_parallel", False) or tp == 1:
        return full
    axis = like.partition_dim
    n = full.shape[axis] // tp
    return full.narrow(axis, tp_rank * n, n)


def ema_state(
    ema: dict[str, torch.Tensor], chunks: list[Chunk], blocks: str, n_averaged: int
) -> dict[str, ShardedTensor]:
    """The EMA copies under ``AveragedModel``'s names (``module.<name>``, ``n_averaged``)."""
    params = dict(named_parameters(chunks, blocks))
    state = {f"module.{n}": sharded(f"runtime.ema.module.{n}", t, params[n]) for n, t in ema.items()}
    count = torch.tensor(n_averaged, dtype=torch.long)
    state["n_averaged"] = ShardedTensor.from_rank_offsets(
        "runtime.ema.n_averaged", count, replica_id=(mpu.get_pipeline_model_parallel_rank(), *_replica())
    )
    return state


def _replica() -> tuple[int, int]:
    """``(tensor rank, data rank)``: a replicated tensor's replica index (all zeros: the writer)."""
    return mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank(with_context_parallel=True)
