"""Tensor parallelism from a network's :class:`~dfm.domain.networks.plan.ParallelPlan` (DTensor).

The plan's patterns go to ``parallelize_module`` unchanged (it matches each part of a dotted name with
``fnmatch``): column-parallel linears become :class:`ColwiseParallel` (replicated input, output
``[..., out / tp]`` as a plain local tensor), row-parallel linears :class:`RowwiseParallel` (input
sharded on its last dimension, output all-reduced), and norms over the concatenation of all heads
:class:`HeadNormParallel`. Replicated modules stay plain parameters; FSDP shards them over the data
ranks only, and their gradients are identical on every tensor-parallel rank (the backward of a
column-parallel linear's replicated input all-reduces the partial gradients).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from dfm.adapters.torch_dist.head_norm import HeadNormForward
from dfm.adapters.torch_dist.state import listing
from dfm.domain.networks.plan import ParallelPlan


class HeadNormParallel(ParallelStyle):
    """Shard an ``nn.RMSNorm`` over all heads like the column-parallel projection feeding it.

    DTensor cannot normalise over a sharded dimension (``rms_norm`` on ``Shard(-1)`` fails), so the
    weight is distributed as ``Shard(0)`` and the module's ``forward`` is replaced on the instance by
    :class:`HeadNormForward` (parameter names do not change).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.RMSNorm) or module.weight is None or len(module.normalized_shape) != 1:
            raise ValueError(f"head_norms must name nn.RMSNorm modules with a weight over one dim, got {module!r}")
        sharded = distribute_tensor(module.weight, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
        module.register_parameter("weight", nn.Parameter(sharded, requires_grad=module.weight.requires_grad))
        module.forward = HeadNormForward(module, device_mesh.get_group())
        return module


def tensor_parallel_styles(plan: ParallelPlan) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of a network's parallel plan."""
    styles: dict[str, ParallelStyle] = {pattern: ColwiseParallel() for pattern in plan.column_parallel}
    styles |= {pattern: RowwiseParallel() for pattern in plan.row_parallel}
    styles |= {pattern: HeadNormParallel() for pattern in plan.head_norms}
    return styles


def apply_tensor_parallel(model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh) -> None:
    """Split ``model``'s linears and head norms over the 1-D tensor-parallel ``mesh`` (meta tensors work).

    Raises:
        ValueError: If the plan leaves a linear unassigned (it would silently stay whole), or a projection
            width is not divisible by the tensor-parallel size.
    """
    unassigned = plan.unassigned_linears(model)
    if unassigned:
        raise ValueError(
            f"parallel.tensor={mesh.size()}: the network's parallel plan does not say how to split these linears: "
            f"{listing(unassigned)}"
        )
    tp = mesh.size()
    columns = {name for name, _ in plan.modules_matching(model, plan.column_parallel)}
    for name, module in plan.modules_matching(model, plan.column_parallel + plan.row_parallel):
        width = module.out_features if name in columns else module.in_features
        if width % tp:
            raise ValueError(f"parallel.tensor={tp} does not divide the {width} features of {name}")
    parallelize_module(model, mesh, tensor_parallel_styles(plan))
