"""The ``megatron`` runtime: megatron-core tensor, pipeline, context and data parallelism.

- :mod:`.engine`: sizes, ``initialize_model_parallel``, topology;
- :mod:`.model` / :mod:`.stage` / :mod:`.init`: the network as megatron model chunks, initialised with
  the one-process weights;
- :mod:`.runtime`: :class:`MegatronRuntime` (megatron DDP, distributed optimizer, schedules);
- :mod:`.state` / :mod:`.checkpoint_io`: sharded checkpoints with ``dist_checkpointing``.
"""

from dfm.adapters.megatron.checkpoint_io import DistCheckpointIO
from dfm.adapters.megatron.engine import MegatronSizes, megatron_sizes
from dfm.adapters.megatron.runtime import MegatronRuntime

__all__ = ["DistCheckpointIO", "MegatronRuntime", "MegatronSizes", "megatron_sizes"]
