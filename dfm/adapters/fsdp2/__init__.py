"""The ``fsdp2`` runtime: PyTorch FSDP2/HSDP with DTensor tensor parallelism and Ulysses context parallelism.

:class:`FSDP2Runtime` implements :class:`~dfm.ports.runtime.ParallelRuntime`; the helpers every
DTensor runtime shares (process group, mesh, sequence sharding, AdamW, schedule, checkpointing) live
in :mod:`dfm.adapters.torch_dist`.
"""

from dfm.adapters.fsdp2.context_parallel import StagedForward
from dfm.adapters.fsdp2.parallelize import ShardingOptions, build_sharded_network
from dfm.adapters.fsdp2.runtime import FSDP2Runtime
from dfm.adapters.fsdp2.tensor_parallel import HeadNormParallel, apply_tensor_parallel

__all__ = [
    "FSDP2Runtime",
    "HeadNormParallel",
    "ShardingOptions",
    "StagedForward",
    "apply_tensor_parallel",
    "build_sharded_network",
]
