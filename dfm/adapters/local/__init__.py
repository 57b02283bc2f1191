"""The ``local`` runtime: one process on the CPU or one GPU, the embedded default and numerical reference.

:class:`LocalRuntime` implements :class:`~dfm.ports.runtime.ParallelRuntime`; the helpers (LR schedule,
AdamW parameter groups, EMA, activation checkpointing) are plain ``torch`` and documented in their modules.
"""

from dfm.adapters.local.checkpointing import apply_activation_checkpointing, checkpoint_module, is_checkpointed
from dfm.adapters.local.ema import build_ema, reset_ema
from dfm.adapters.local.optim import NO_DECAY_SUFFIXES, build_adamw, decays, param_groups
from dfm.adapters.local.runtime import LocalRuntime, build_network, resolve_device, resolve_precision
from dfm.adapters.local.schedule import build_scheduler, check_optimizer_settings, lr_factor

__all__ = [
    "NO_DECAY_SUFFIXES",
    "LocalRuntime",
    "apply_activation_checkpointing",
    "build_adamw",
    "build_ema",
    "build_network",
    "build_scheduler",
    "check_optimizer_settings",
    "checkpoint_module",
    "decays",
    "is_checkpointed",
    "lr_factor",
    "param_groups",
    "reset_ema",
    "resolve_device",
    "resolve_precision",
]
