"""The fsdp2 runtime's staged forward (context parallelism over the video tokens).

It is shared with multi-process generation, so it lives in :mod:`dfm.adapters.torch_dist.staged`; this
module keeps the fsdp2 import path (``dfm.adapters.fsdp2.context_parallel.StagedForward``).
"""

from dfm.adapters.torch_dist.staged import StagedForward

__all__ = ["StagedForward"]
