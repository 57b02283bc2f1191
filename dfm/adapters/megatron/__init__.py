"""The ``megatron`` runtime: megatron-core tensor, pipeline, context and data parallelism.

- :mod:`.engine`: sizes, ``initialize_model_parallel``, topology;
- :mod:`.model` / :mod:`.stage` / :mod:`.init`: the network as megatron model chunks, initialised with
  the one-process weights;
- :mod:`.runtime`: :class:`MegatronRuntime` (the chunks, schedules, weights and state);
- :mod:`.optimizer`: what training attaches (megatron DDP, its distributed optimizer);
- :mod:`.state` / :mod:`.checkpoint_io`: sharded checkpoints with ``dist_checkpointing``.
"""

import warnings

# megatron-core announces on import that it falls back to torch without Transformer Engine or Apex; dfm
# uses neither (README, "The Megatron-core runtime"), so the four warnings say nothing to its users.
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning)

from dfm.adapters.megatron.checkpoint_io import DistCheckpointIO  # noqa: E402
from dfm.adapters.megatron.engine import MegatronSizes, megatron_sizes  # noqa: E402
from dfm.adapters.megatron.runtime import MegatronRuntime  # noqa: E402

__all__ = ["DistCheckpointIO", "MegatronRuntime", "MegatronSizes", "megatron_sizes"]
