"""``torch`` and ``torch.distributed`` helpers the runtimes share (the one package adapters may all import).

- :mod:`.process_group`: the launcher's environment and the default process group;
- :mod:`.mesh`: the ``dp_replicate x dp_shard x cp x tp`` device mesh, its sizes and the topology;
- :mod:`.sequence`: context parallelism (sequence sharding, gathering, Ulysses attention);
- :mod:`.staged`: the root network's forward as stages, context parallel over the video tokens (training, sampling);
- :mod:`.parallel_sampling`: multi-process generation (CFG parallel x context parallel);
- :mod:`.core`: the training step and state every runtime shares (:class:`TrainingCore`), over engine hooks;
- :mod:`.schedule`, :mod:`.ema`, :mod:`.optim`, :mod:`.grads`, :mod:`.checkpointing`, :mod:`.state`: the LR
  schedule, the EMA, AdamW and its parameter groups, gradient norms and clipping, activation checkpointing
  that keeps parameter names, and state checks.
"""

from dfm.adapters.torch_dist.checkpointing import apply_activation_checkpointing, checkpoint_module, is_checkpointed
from dfm.adapters.torch_dist.collectives import all_gather_json
from dfm.adapters.torch_dist.core import Tally, TrainingCore
from dfm.adapters.torch_dist.ema import EMA
from dfm.adapters.torch_dist.head_norm import HeadNormForward
from dfm.adapters.torch_dist.mesh import DIM_NAMES, MeshSizes, build_mesh, fsdp_mesh, resolve_sizes, topology
from dfm.adapters.torch_dist.optim import build_adamw, materialize_state, param_groups
from dfm.adapters.torch_dist.process_group import DistEnv, destroy, init_process_group
from dfm.adapters.torch_dist.schedule import Schedule, check_optimizer_settings, lr_factor
from dfm.adapters.torch_dist.sequence import (
    GatherSequence,
    UlyssesAttention,
    gather_sequence,
    shard_sequence,
    use_ulysses_attention,
)
from dfm.adapters.torch_dist.state import check_compatible

__all__ = [
    "DIM_NAMES",
    "EMA",
    "DistEnv",
    "GatherSequence",
    "HeadNormForward",
    "MeshSizes",
    "Schedule",
    "Tally",
    "TrainingCore",
    "UlyssesAttention",
    "all_gather_json",
    "apply_activation_checkpointing",
    "build_adamw",
    "build_mesh",
    "check_compatible",
    "check_optimizer_settings",
    "checkpoint_module",
    "destroy",
    "fsdp_mesh",
    "gather_sequence",
    "init_process_group",
    "is_checkpointed",
    "lr_factor",
    "materialize_state",
    "param_groups",
    "resolve_sizes",
    "shard_sequence",
    "topology",
    "use_ulysses_attention",
]
