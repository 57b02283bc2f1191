"""FP8 training of the network's planned linears with torchao's float8 recipe (``train.fp8``; NVIDIA GPUs only).

The linears the network's parallel plan names (``column_parallel`` and ``row_parallel``: attention projections
and the feed-forward layers, the GEMMs that carry a block's FLOPs) become torchao ``Float8Linear`` s: their
matmuls run in float8 (e4m3 forward, e5m2 gradients, dynamic per-tensor scales) while the weights, gradients and
optimizer state keep their dtype. Parameter names do not change, so checkpoints load with or without FP8.
Everything else (norms, embeddings, the time embedding, modulation tables, the output head) stays as it was.
torchao is an optional dependency (``pip install torchao``), imported only when ``train.fp8`` is on.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from dfm.domain.networks.plan import ParallelPlan

FP8_CAPABILITY = (8, 9)
"""The oldest CUDA compute capability with FP8 tensor cores (Ada Lovelace; Hopper is 9.0)."""


def check_fp8(device: torch.device) -> None:
    """Raise ``ValueError`` (naming ``train.fp8``) unless FP8 training can run on ``device``.

    Raises:
        ValueError: Without CUDA, on a GPU older than compute capability 8.9, or without torchao installed.
    """
    if device.type != "cuda":
        raise ValueError(
            f"train.fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer), but this run "
            f"is on {device.type}; set train.fp8=false"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ValueError(
            f"train.fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; set train.fp8=false"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("train.fp8 needs torchao's float8 training: pip install torchao (or set train.fp8=false)")


def convert_to_fp8(model: nn.Module, plan: ParallelPlan) -> list[str]:
    """Swap the plan's linears whose sizes FP8 GEMMs take (multiples of 16) for torchao ``Float8Linear`` s.

    Call it before sharding, activation checkpointing and compilation (as torchao's own recipes do). The token
    count need not be a multiple of 16 (WAN 1.3B at 81 x 480 x 832 has 32,760): the weight-gradient GEMM, whose
    inner dimension is the tokens, is zero-padded to one (torchao's ``pad_inner_dim``), which ``_scaled_mm``
    requires.

    Returns:
        The names of the converted linears.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    planned = {name for name, _ in plan.modules_matching(model, plan.column_parallel + plan.row_parallel)}
    chosen = [
        name
        for name, module in model.named_modules()
        if name in planned
        and isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]
    wanted = set(chosen)
    config = Float8LinearConfig(pad_inner_dim=True)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _, fqn: fqn in wanted)
    return chosen
