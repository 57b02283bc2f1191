"""The ``local`` runtime: one process on the CPU or one GPU, the embedded default and numerical reference.

:class:`LocalRuntime` implements :class:`~dfm.ports.runtime.ParallelRuntime` over the shared training core
(:mod:`dfm.adapters.torch_dist.core`); its state helpers live here; the helpers every runtime shares (LR
schedule, AdamW parameter groups, activation checkpointing) are re-exported for convenience.
"""

from dfm.adapters.local.runtime import (
    LocalRuntime,
    build_network,
    empty_network,
    resolve_device,
    resolve_precision,
)
from dfm.adapters.torch_dist.checkpointing import apply_activation_checkpointing, checkpoint_module, is_checkpointed
from dfm.adapters.torch_dist.optim import build_adamw, param_groups
from dfm.adapters.torch_dist.schedule import check_optimizer_settings, lr_factor

__all__ = [
    "LocalRuntime",
    "apply_activation_checkpointing",
    "build_adamw",
    "build_network",
    "check_optimizer_settings",
    "checkpoint_module",
    "empty_network",
    "is_checkpointed",
    "lr_factor",
    "param_groups",
    "resolve_device",
    "resolve_precision",
]
