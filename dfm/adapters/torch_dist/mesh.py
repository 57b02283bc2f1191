"""The device mesh of the DTensor runtimes: data replicate x data shard x context x tensor.

The mesh has four dimensions, outermost first: ``dp_replicate`` (HSDP replicas), ``dp_shard``
(FSDP shards), ``cp`` (Ulysses context parallelism) and ``tp`` (tensor parallelism, innermost so its
ranks share a host's NVLink). Two flattened dimensions are added: ``dp`` = ``dp_replicate`` x
``dp_shard`` (ranks that see different samples) and ``dp_shard_cp`` = ``dp_shard`` x ``cp`` (the ranks
FSDP shards parameters over: context-parallel ranks sum their gradients like data-parallel ones).
Context- and tensor-parallel ranks of one ``dp`` coordinate read the same samples.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dfm.domain.layout import ParallelLayout
from dfm.ports.runtime import Topology

DIM_NAMES = ("dp_replicate", "dp_shard", "cp", "tp")
"""The mesh dimensions, outermost first."""


@attrs.frozen(kw_only=True)
class MeshSizes:
    """The size of every mesh dimension, each >= 1 (``data_shard`` already inferred)."""

    data_replicate: int = 1
    """HSDP replicas (``parallel.data_replicate``)."""
    data_shard: int = 1
    """FSDP shards (``parallel.data_shard``)."""
    context: int = 1
    """Context-parallel ranks (``parallel.context``)."""
    tensor: int = 1
    """Tensor-parallel ranks (``parallel.tensor``)."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The mesh shape in :data:`DIM_NAMES` order."""
        return (self.data_replicate, self.data_shard, self.context, self.tensor)

    @property
    def world(self) -> int:
        """The number of ranks the layout spans."""
        return math.prod(self.shape)

    @property
    def dp(self) -> int:
        """Data-parallel size: ranks that see different samples."""
        return self.data_replicate * self.data_shard


def resolve_sizes(
    world: int,
    *,
    data_replicate: int = 1,
    data_shard: int = -1,
    context: int = 1,
    tensor: int = 1,
    pipeline: int = 1,
    heads: int | None = None,
    hidden: int | None = None,
    ffn: int | None = None,
) -> MeshSizes:
    """Check the ``parallel`` config against the world size and the model, inferring ``data_shard=-1``.

    The arithmetic and its messages are :class:`~dfm.domain.layout.ParallelLayout`'s; this mesh has no pipeline.

    Args:
        world: The number of processes launched.
        data_replicate: ``parallel.data_replicate``.
        data_shard: ``parallel.data_shard``; ``-1`` = ``world / (data_replicate * context * tensor)``.
        context: ``parallel.context``.
        tensor: ``parallel.tensor``.
        pipeline: ``parallel.pipeline``; must be 1 (pipelines are the Megatron runtime's).
        heads: The model's attention heads (``None``: not checked); split by ``tensor * context``.
        hidden: The model's hidden size (``None``: not checked); split by ``tensor``.
        ffn: The model's feed-forward size (``None``: not checked); split by ``tensor``.

    Returns:
        The size of every mesh dimension.

    Raises:
        ValueError: With every offending ``parallel.*`` key and value, if a size is invalid, the
            pipeline is asked for, the sizes do not multiply to ``world`` (or ``data_shard`` cannot be
            inferred), or the model's heads/hidden/FFN sizes do not divide.
    """
    layout = ParallelLayout(
        data_replicate=data_replicate, data_shard=data_shard, context=context, tensor=tensor, pipeline=pipeline
    )
    if pipeline > 1:
        raise ValueError(
            f"parallel.pipeline={pipeline}: this runtime has no pipeline parallelism (its device mesh is "
            "data_replicate x data_shard x context x tensor); use runtime=megatron for pipeline stages, "
            "or set parallel.pipeline=1"
        )
    resolved = layout.resolve(world)
    resolved.check_model(heads=heads, hidden=hidden, ffn=ffn)
    return MeshSizes(data_replicate=data_replicate, data_shard=resolved.data_shard, context=context, tensor=tensor)


def build_mesh(device_type: str, sizes: MeshSizes) -> DeviceMesh:
    """The 4-D mesh of :data:`DIM_NAMES` over the default process group, plus ``dp`` and ``dp_shard_cp``.

    A collective call: every rank must make it, with the same sizes.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        sizes: From :func:`resolve_sizes` with this job's world size.

    Raises:
        ValueError: If there is no process group, or the sizes do not span its world.
    """
    if not dist.is_initialized():
        raise ValueError("build_mesh needs the default process group: call init_process_group first")
    if sizes.world != dist.get_world_size():
        raise ValueError(f"the mesh {sizes.shape} spans {sizes.world} ranks, but the world has {dist.get_world_size()}")
    mesh = init_device_mesh(device_type, sizes.shape, mesh_dim_names=DIM_NAMES)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh ``fully_shard`` uses: ``dp_shard_cp`` (FSDP), or ``(dp_replicate, dp_shard_cp)`` (HSDP)."""
    if mesh["dp_replicate"].size() == 1:
        return mesh["dp_shard_cp"]
    return mesh["dp_replicate", "dp_shard_cp"]


def topology(mesh: DeviceMesh, device: torch.device | str) -> Topology:
    """This rank's place in a mesh from :func:`build_mesh`: data rank/size over ``dp``, the tp and cp sizes."""
    dp = mesh["dp"]
    return Topology(
        world_size=mesh.size(),
        rank=dist.get_rank(),
        dp_size=dp.size(),
        dp_rank=dp.get_local_rank(),
        tp_size=mesh["tp"].size(),
        cp_size=mesh["cp"].size(),
        pp_size=1,
        device=str(torch.device(device)),
    )
