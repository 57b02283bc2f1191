"""The ``megatron`` section: knobs of the megatron-core engine only (sizes are in ``parallel``)."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class MegatronConfig:
    """Megatron-core options; read by ``runtime: megatron`` only."""

    distributed_optimizer: bool = True
    """Shard the optimizer state (float32 main weights, Adam moments) over the data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduction with the backward pass (megatron DDP buckets)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: between the tensor-parallel linears the video tokens are split over
    the sequence across the tensor-parallel ranks (less activation memory; no effect with ``parallel.tensor=1``)."""
