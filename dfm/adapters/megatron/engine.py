"""Megatron-core engine setup: sizes from the ``parallel.*`` keys, ``initialize_model_parallel``, seeds, topology.

Megatron orders ranks ``tp-cp-ep-dp-pp`` (tensor innermost): the data-parallel size is what is left of
the world after ``tensor x context x pipeline``. Context-parallel ranks of one data-parallel index
read the same samples; megatron's distributed data parallel reduces gradients over data x context.
"""

from __future__ import annotations

import math
from datetime import timedelta

import attrs
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from dfm.adapters.torch_dist.process_group import DistEnv, init_process_group
from dfm.domain.layout import ParallelLayout
from dfm.ports.runtime import Topology


@attrs.frozen(kw_only=True)
class MegatronSizes:
    """The parallel sizes of a megatron job, each >= 1."""

    tensor: int = 1
    """Tensor-parallel ranks (``parallel.tensor``)."""
    context: int = 1
    """Context-parallel ranks (``parallel.context``; Ulysses attention)."""
    pipeline: int = 1
    """Pipeline stages (``parallel.pipeline``)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); ``None`` for one."""
    data: int = 1
    """Data-parallel ranks: ``world / (tensor * context * pipeline)``."""

    @property
    def chunks(self) -> int:
        """Model chunks per rank (1 without a virtual pipeline)."""
        return self.virtual_pipeline or 1


def megatron_sizes(
    world: int,
    *,
    tensor: int = 1,
    context: int = 1,
    pipeline: int = 1,
    virtual_pipeline: int | None = None,
    data_replicate: int = 1,
    data_shard: int = -1,
    heads: int | None = None,
    hidden: int | None = None,
    ffn: int | None = None,
    layers: int | None = None,
) -> MegatronSizes:
    """Check the ``parallel`` keys against the world size and the model (:class:`~dfm.domain.layout.ParallelLayout`).

    ``data_shard`` is the data-parallel size (``-1`` infers it); ``data_replicate`` must be 1 (megatron's
    distributed optimizer shards over the whole data-parallel group).

    Raises:
        ValueError: Naming the offending ``parallel.*`` keys.
    """
    if data_replicate != 1:
        raise ValueError(
            f"parallel.data_replicate={data_replicate}: the megatron runtime has no HSDP replicas; set it to 1"
        )
    vpp = virtual_pipeline if virtual_pipeline and virtual_pipeline > 1 else None
    layout = ParallelLayout(
        data_shard=data_shard, context=context, tensor=tensor, pipeline=pipeline, virtual_pipeline=vpp
    ).resolve(world)
    layout.check_model(heads=heads, hidden=hidden, ffn=ffn, layers=layers)
    return MegatronSizes(tensor=tensor, context=context, pipeline=pipeline, virtual_pipeline=vpp, data=layout.dp)


def initialize(device_type: str, sizes: MegatronSizes, seed: int, timeout: timedelta, env: DistEnv) -> torch.device:
    """Join the process group and build megatron's parallel groups; seed megatron's RNG tracker on CUDA.

    Returns this rank's device. Megatron keeps its groups in module state: one layout per process.
    """
    init_process_group(device_type, timeout, env=env)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline,
        context_parallel_size=sizes.context,
        distributed_timeout_minutes=max(1, math.ceil(timeout.total_seconds() / 60)),
    )
    device = env.device(device_type)
    if device.type == "cuda":  # megatron's convention: one seed, offset per tensor-parallel rank for dropout
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return device


def megatron_topology(sizes: MegatronSizes, device: torch.device) -> Topology:
    """This rank's :class:`Topology` from megatron's groups."""
    return Topology(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_size=sizes.tensor,
        cp_size=sizes.context,
        pp_size=sizes.pipeline,
        device=str(device),
    )


def teardown() -> None:
    """Destroy megatron's groups (the default process group is the caller's to destroy)."""
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
